"""The rebalancer's sliding load window (cluster/instance/rebalancer.py LoadWindow), on a clock of its own."""

import torch

from cluster.instance.rebalancer import WINDOW_READINGS, LoadWindow


def test_the_window_holds_the_last_window_s_of_load_and_slides():
    window = LoadWindow(window_s=8.0)  # a reading every second
    per_second = torch.tensor([[1, 0], [0, 2]])
    total = torch.zeros(2, 2, dtype=torch.long)
    for second in range(20):
        window.read(float(second), total.clone)
        total += per_second * (10 if second == 3 else 1)  # a burst in second 3
    # the oldest reading kept is from second 11: seconds 11..19 are in the window
    assert torch.equal(window.load(total), per_second * (WINDOW_READINGS + 1))
    assert window.load(total)[0, 0] < total[0, 0]  # the burst has slid out


def test_readings_come_only_when_due_and_the_first_at_once():
    window = LoadWindow(window_s=80.0)
    reads = []

    def total() -> torch.Tensor:
        reads.append(len(reads))
        return torch.zeros(1, 1, dtype=torch.long)

    for tick in range(100):  # a tick every 0.1 s for 10 s: due every 10 s
        window.read(tick / 10, total)
    assert reads == [0]
    window.read(10.0, total)
    assert reads == [0, 1]
    assert torch.equal(LoadWindow(1.0).load(torch.ones(1, 1)), torch.ones(1, 1))  # no reading yet: all
