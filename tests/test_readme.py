"""README's two set-up commands are what .ci/run runs, and the paths README names exist."""

from __future__ import annotations

import re

from tests.toolkit import REPO

README = (REPO / "README.md").read_text()
CI_RUN = (REPO / ".ci" / "run").read_text()


def bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL)]


def ci_commands() -> str:
    """.ci/run's commands joined with &&, comments and shell set-up left out."""
    lines = [line.strip() for line in CI_RUN.splitlines()]
    skip = ("#", "set ", "cd ", "export ", "python3 -m venv")
    return " && ".join(line for line in lines if line and not line.startswith(skip))


def test_ci_runs_readmes_two_set_up_commands():
    runtime, tests = bash_blocks(README)[:2]
    assert runtime.startswith("python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && ")
    assert "[dev" not in runtime and "grafana" not in runtime, "command 1 installs the runtime only"
    assert runtime.endswith(
        'moe-cluster generate --prompt "def read_config(path):" --max-tokens 24 --json'
    )
    assert "pytest" in tests and "install-test-tools.sh" in tests and "[dev,grafana]" in tests
    ci = ci_commands()
    assert runtime.removeprefix("python3 -m venv .venv && ") in ci
    for part in tests.split(" && "):
        assert part in ci, f".ci/run lacks README's {part!r}"


def test_readme_links_and_module_paths_exist():
    for link in re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)\)", README):
        assert (REPO / link).exists(), link
    for path in re.findall(r"`((?:cluster|router|experts|benchmarks|tests|scripts)/[\w/.]+)`", README):
        assert (REPO / path).exists(), f"README names {path}, which does not exist"
    for module, attr in re.findall(r"`(cluster(?:\.\w+)+):(\w+)`", README):
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), module
        assert f"def {attr}" in (REPO / (module.replace(".", "/") + ".py")).read_text(), (module, attr)
