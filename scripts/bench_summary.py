#!/usr/bin/env python
"""One-line summaries for scripts/bench_gpu.sh.

    bench.py --json ... | python scripts/bench_summary.py SECTION RESULTS SUMMARY
        tags each JSON line of bench.py with "section": SECTION, appends it to RESULTS (JSON lines)
        and writes one readable line per configuration to stdout and SUMMARY
    python scripts/bench_summary.py --curve METRICS
        one line from a run's metrics.jsonl: its training and held-out losses, its last tokens/s
"""

from __future__ import annotations

import json
import sys


def describe(r: dict) -> str:
    """One line for one bench.py result (or a variant's error)."""
    name = f"{r['section']} [{r.get('variant', '') or 'as given'}]"
    if "error" in r:
        return f"{name}: failed: {r['error']}"
    s, b = r["ssltrain"], r.get("hf_baseline") or {}
    text = (f"{name} micro {r['micro_batch_size']}: ssltrain {s['tokens_per_s']:.0f} tok/s mfu {s['mfu']} "
            f"mem {s['peak_memory_gib']} GiB")
    if b:
        text += f" | hf {b['tokens_per_s']:.0f} tok/s mfu {b['mfu']} | ratio {r['speedup_vs_hf']}"
    if "loss" in r:
        loss = r["loss"]
        text += f" | loss alone eager {loss['eager_ms']} compiled {loss['compiled_ms']} hf {loss['hf_ms']} ms"
    if "profile" in r:
        prof = r["profile"]
        top = "; ".join(f"{t['op'][:40]} {t['share']:.0%}" for t in prof["top"][:6])
        text += f" | {prof['total_ms_per_step']} ms/step in kernels: {top}"
    return text


def describe_curve(path: str) -> str:
    records = [json.loads(line) for line in open(path)]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    return ("train loss " + " ".join(f"{r['loss']:.4f}" for r in train)
            + " | held-out loss " + " ".join(f"{r['loss']:.4f}" for r in evals)
            + (f" | {train[-1]['tokens_per_s']:.0f} tok/s at the end" if train else ""))


def main() -> None:
    if sys.argv[1] == "--curve":
        print(describe_curve(sys.argv[2]))
        return
    section, results_path, summary_path = sys.argv[1:4]
    with open(results_path, "a") as results, open(summary_path, "a") as summary:
        for line in sys.stdin:
            try:
                r = json.loads(line)
            except ValueError:
                continue  # anything else bench.py printed
            r = {"section": section, **r}
            results.write(json.dumps(r) + "\n")
            text = describe(r)
            print(text, flush=True)
            summary.write(text + "\n")


if __name__ == "__main__":
    main()
