"""xgrammar vs llguidance on this CPU: schema compile time and token-mask time per decode step.

Walks a batch of 16 matchers along valid JSON documents token by token (the demo tokenizer), timing the
mask fill for the whole batch each step and the mask's application to [16, vocab] logits. Writes
benchmarks/results/grammar_mask-<date>.json.

    PYTHONPATH=. python benchmarks/grammar_mask.py [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import transformers

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
DOCUMENT = {"name": "Ada Lovelace", "age": 36, "tags": ["a", "c"], "address": {"city": "London"}}
BATCH = 16


def _xgrammar(hf_tok, vocab: int):
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(hf_tok, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    started = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    compile_s = time.perf_counter() - started
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(BATCH)]
    bitmask = xgr.allocate_token_bitmask(BATCH, vocab)

    def fill() -> None:
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)

    def accept(token: int) -> None:
        for m in matchers:
            assert m.accept_token(token), token

    return compile_s, fill, accept, lambda logits: xgr.apply_token_bitmask_inplace(logits, bitmask)


def _llguidance(hf_tok, vocab: int):
    import llguidance
    import llguidance.hf
    import llguidance.torch as llt

    lltok = llguidance.hf.from_tokenizer(hf_tok, n_vocab=vocab)
    started = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(SCHEMA), defaults={"whitespace_flexible": False}
    )
    matchers = [llguidance.LLMatcher(lltok, grammar) for _ in range(BATCH)]
    compile_s = time.perf_counter() - started
    bitmask = llt.allocate_token_bitmask(BATCH, vocab)

    def fill() -> None:
        for i, m in enumerate(matchers):
            llt.fill_next_token_bitmask(m, bitmask, i)

    def accept(token: int) -> None:
        for m in matchers:
            assert m.consume_token(token), (token, m.get_error())

    return compile_s, fill, accept, lambda logits: llt.apply_token_bitmask_inplace(logits, bitmask)


def measure(name: str, hf_tok, vocab: int, tokens: list[int]) -> dict:
    compile_s, fill, accept, apply = {"xgrammar": _xgrammar, "llguidance": _llguidance}[name](hf_tok, vocab)
    logits = torch.randn(BATCH, vocab)
    fill_ms, apply_ms = [], []
    for token in tokens:
        started = time.perf_counter()
        fill()
        fill_ms.append((time.perf_counter() - started) * 1e3)
        started = time.perf_counter()
        apply(logits)
        apply_ms.append((time.perf_counter() - started) * 1e3)
        accept(token)
    return {
        "compile_ms": compile_s * 1e3,
        "fill_ms_per_step_batch16": {
            "median": statistics.median(fill_ms),
            "p90": sorted(fill_ms)[int(0.9 * len(fill_ms))],
            "max": max(fill_ms),
        },
        "apply_ms_per_step_batch16": statistics.median(apply_ms),
        "steps": len(tokens),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="a model directory with tokenizer.json")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.model is None:
        from cluster.demo import demo_model_path

        args.model = str(demo_model_path())
    hf_tok = transformers.AutoTokenizer.from_pretrained(args.model)
    vocab = transformers.AutoConfig.from_pretrained(args.model).vocab_size
    tokens = hf_tok.encode(json.dumps(DOCUMENT, separators=(",", ":")), add_special_tokens=False)
    runs = {
        name: [measure(name, hf_tok, vocab, tokens) for _ in range(args.repeats)]
        for name in ("xgrammar", "llguidance")
    }
    summary = {
        name: {
            "fill_ms_median_per_run": [r["fill_ms_per_step_batch16"]["median"] for r in results],
            "compile_ms_per_run": [r["compile_ms"] for r in results],
        }
        for name, results in runs.items()
    }
    for name, s in summary.items():
        fill, compile_ms = s["fill_ms_median_per_run"], s["compile_ms_per_run"]
        print(f"{name}: mask fill {fill} ms/step (batch 16), compile {compile_ms} ms")
    ratio = statistics.median(summary["llguidance"]["fill_ms_median_per_run"]) / statistics.median(
        summary["xgrammar"]["fill_ms_median_per_run"]
    )
    print(f"llguidance / xgrammar mask time: {ratio:.2f}")
    out = {
        "benchmark": "grammar_mask",
        "date": datetime.now(UTC).isoformat(),
        "loadavg": os.getloadavg(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "tokenizer": args.model,
        "vocab": vocab,
        "batch": BATCH,
        "runs": runs,
        "summary": summary,
        "llguidance_over_xgrammar_fill": ratio,
    }
    path = Path("benchmarks/results") / f"grammar_mask-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(out, indent=2))
    print(path)


if __name__ == "__main__":
    main()
