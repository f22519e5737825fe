#!/usr/bin/env python
"""Throughput of ssltrain's real training step (same objective, model, collator, optimizer and
precision code as `ssltrain`), for a fixed number of warm-up and timed optimizer steps.

    python scripts/bench.py                                   # tiny BERT MLM on CPU
    python scripts/bench.py model=bert-base hardware=gpu trainer.micro_batch_size=128
    python scripts/bench.py --json objective=ar model=gpt2 hardware=gpu trainer.seq_len=1024

Prints tokens/s, step time, model FLOPs utilisation (MFU) and peak memory.
FLOPs per token = 6 x (non-embedding params + vocab x hidden) + 12 x layers x hidden x seq_len.

    python scripts/bench.py --overhead --no-baseline          # + the real loop's overhead

--overhead also times the real loop (ssltrain.train.train: train-data iterator, collator, metric
accumulation, logging every trainer.log_every steps) against a bare loop of the same step on batches
collated up front, alternating the two so a shared machine's load falls on both alike, and reports
overhead = (loop step time - bare step time) / bare step time.

    python scripts/bench.py --loss --no-baseline objective=ar model=gpt2-tiny   # + the loss alone
    python scripts/bench.py --profile 5 --trace trace.json    # + where the step's time goes

--loss also times the token cross-entropy alone, forward and backward, on random logits of the
run's shape (micro-batch x seq_len x padded vocabulary, every position labelled, in the run's
precision): eager and compiled (hardware.compile_loss), against F.cross_entropy on the unsliced
logits (the plain HF loss).

--profile N runs N more steps of ssltrain's step under torch.profiler and reports the operators
with the most self time (device time on a GPU, CPU time otherwise) per step, with their share of
the total; --trace FILE also writes the Chrome trace (chrome://tracing, Perfetto).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ssltrain.cli import one_line, preflight
from ssltrain.data.loader import DataPosition, build_train_data
from ssltrain.errors import UserError
from ssltrain.objectives import functional
from ssltrain.paths import config_dir
from ssltrain.train import TrainStep, build_training, train

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


def flops_per_token(model, seq_len: int) -> float:
    config = model.config
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    non_embedding = sum(p.numel() for p in model.parameters()) - embedding
    return 6 * (non_embedding + config.vocab_size * hidden) + 12 * layers * hidden * seq_len


def hf_baseline_step(cfg, model_config, tokenizer, examples, device, micro_batch_size: int, accum: int):
    """The plain Hugging Face recipe: *ForMaskedLM / *ForCausalLM with DataCollatorForLanguageModeling,
    torch AdamW, autocast in the configured precision. Same model config, data and batch size."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, DataCollatorForLanguageModeling

    causal = cfg.model.attention == "causal"
    auto = AutoModelForCausalLM if causal else AutoModelForMaskedLM
    model = auto.from_config(model_config).to(device)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=not causal, mlm_probability=0.15)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.hardware.mixed_precision)
    rows = examples["train"]
    position = [0]

    def step() -> int:
        tokens = 0
        for _ in range(accum):
            start = position[0] % max(1, len(rows) - micro_batch_size)
            position[0] += micro_batch_size
            batch = collator([{"input_ids": ids} for ids in rows[start:start + micro_batch_size]["input_ids"]])
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = model(**batch).loss
            (loss / accum).backward()
            tokens += batch["input_ids"].numel()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return tokens

    return model, step


def measure(step, warmup: int, steps: int, device: torch.device) -> tuple[float, float, float | None]:
    """(tokens/s, seconds per step, peak GiB) over `steps` timed steps after `warmup`."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    tokens = sum(step() for _ in range(steps))
    sync()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return tokens / elapsed, elapsed / steps, peak


class CountedBatches:
    """The micro-batches of `batches`, counting their input positions (tokens) as they pass."""

    def __init__(self, batches: Iterator[dict]):
        self.batches, self.tokens = batches, 0

    def __iter__(self) -> CountedBatches:
        return self

    def __next__(self) -> dict:
        batch = next(self.batches)
        self.tokens += batch["input_ids"].numel()
        return batch


def build_ssltrain_step(cfg, prebuilt: int = 0) -> dict:
    """ssltrain's step for cfg: the loop's own TrainStep over the loop's own training batches
    (DataLoader with the hardware group's workers and pinned memory), built by the loop's own
    build_training (hardware.compile included). Returns {"step": () -> tokens, "device", "model"
    (the export model), "tokenizer", "examples"}.
    prebuilt > 0: the step cycles over that many micro-batches collated and moved up front, so it
    is the bare forward/backward/clip/optimizer step with no data loading or collator in it."""
    training = build_training(cfg)
    accelerator, t = training.accelerator, cfg.trainer
    device = accelerator.device
    unwrapped = accelerator.unwrap_model(training.objective)
    train_data = build_train_data(training.examples["train"], unwrapped.build_collator(), t.micro_batch_size,
                                  seed=cfg.seed, rank=0, world_size=1)
    workers = 0 if prebuilt else cfg.hardware.num_workers
    source = train_data.batches(DataPosition(), workers, cfg.hardware.pin_memory and not prebuilt)
    if prebuilt:
        ready = [{k: v.to(device) for k, v in next(source).items()} for _ in range(prebuilt)]
        batches = CountedBatches(itertools.cycle(ready))
    else:
        batches = CountedBatches(source)
    run_step = TrainStep(training, batches, max_steps=t.max_steps, grad_clip=cfg.optimizer.grad_clip)
    steps = itertools.count()

    def step() -> int:
        before = batches.tokens
        run_step(next(steps))
        return batches.tokens - before

    return {"step": step, "device": device, "model": unwrapped.export_model(), "tokenizer": training.tokenizer,
            "examples": training.examples, "batches": source}


def real_loop_windows(cfg, windows: int) -> list[tuple[int, float]]:
    """(tokens, seconds) of `windows` consecutive logging windows of a real `ssltrain` run: the
    wall time between two train records covers trainer.log_every whole loop iterations and the
    writing of one record (metrics.jsonl, TensorBoard, console). The first window (warm-up) is
    left out, as are the start-up and the evaluations before and after."""
    every = cfg.trainer.log_every
    run_cfg = OmegaConf.merge(cfg, {"trainer": {"max_steps": (windows + 1) * every, "eval_every": 0,
                                                "eval_batches": 1, "checkpoint_every": 0, "export": False,
                                                "resume": None}})
    with tempfile.TemporaryDirectory() as run_dir:
        train(run_cfg, run_dir)
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["kind"] == "train"]
    return [(b["tokens_seen"] - a["tokens_seen"], b["time"] - a["time"]) for a, b in zip(logged, logged[1:])]


def loop_overhead(cfg, rounds: int, windows: int) -> dict:
    """The real loop against the bare step (build_ssltrain_step(prebuilt=...)), `rounds` times
    alternately, `windows` windows of trainer.log_every steps each. Other processes only ever slow a
    window down (on a shared 2-core machine by up to 10x, in bursts), so the headline compares the
    fastest window of each kind; the medians are reported beside it."""
    every = cfg.trainer.log_every
    bare, loop = [], []
    load_before = os.getloadavg()[0]
    for _ in range(rounds):
        bench = build_ssltrain_step(cfg, prebuilt=8)
        bare += [measure(bench["step"], 2 if i == 0 else 0, every, bench["device"])[0] for i in range(windows)]
        release(bench)
        loop += [tokens / seconds for tokens, seconds in real_loop_windows(cfg, windows)]

    def overhead(bare_tps: float, loop_tps: float) -> float:
        return round(100 * (bare_tps / loop_tps - 1), 2)  # step time: (loop - bare) / bare

    return {"loop_tokens_per_s": round(max(loop), 1), "bare_tokens_per_s": round(max(bare), 1),
            "overhead_pct": overhead(max(bare), max(loop)),
            "overhead_pct_median": overhead(statistics.median(bare), statistics.median(loop)),
            "windows": len(loop), "steps_per_window": every,
            "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def loss_timings(micro_batch: int, seq_len: int, vocab_padded: int, vocab: int, device: torch.device,
                 precision: str, repeats: int = 10) -> dict:
    """Milliseconds for one forward + backward of the token cross-entropy on (micro_batch, seq_len,
    vocab_padded) logits: ssltrain's eager and compiled code, and the plain HF loss (F.cross_entropy
    on the flattened logits in fp32, vocabulary padding included). Fastest of `repeats` runs each."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(micro_batch, seq_len, vocab_padded, generator=g).to(device, dtype).requires_grad_(True)
    labels = torch.randint(vocab, (micro_batch, seq_len), generator=g).to(device)

    def hf_loss():
        flat = logits.float().reshape(-1, vocab_padded)
        return torch.nn.functional.cross_entropy(flat, labels.reshape(-1), reduction="sum"), None, None

    def timed(fn) -> float:
        best = float("inf")
        for _ in range(repeats + 2):  # two untimed calls: compilation and allocator warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()[0].backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
            logits.grad = None
        return round(1000 * best, 2)

    result = {}
    for name, compiled in (("eager_ms", False), ("compiled_ms", True)):
        functional.use_compiled_loss(compiled)
        result[name] = timed(lambda: functional.token_cross_entropy(logits, labels, vocab))
    functional.use_compiled_loss(False)
    result["hf_ms"] = timed(hf_loss)
    return {"shape": [micro_batch, seq_len, vocab_padded], "dtype": str(dtype).removeprefix("torch."), **result}


def profile_step(step, steps: int, device: torch.device, top: int = 15, trace: str | None = None) -> dict:
    """Self time per operator over `steps` profiled steps: the `top` largest, per step, with their
    share of all operators' self time (GPU kernels' time on CUDA, CPU time otherwise)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    if trace:
        prof.export_chrome_trace(trace)
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr) > 0]
    total = sum(getattr(e, attr) for e in events)
    rows = sorted(events, key=lambda e: -getattr(e, attr))[:top]
    return {"time": "device" if cuda else "cpu", "steps": steps, "total_ms_per_step": round(total / 1e3 / steps, 2),
            "top": [{"op": e.key, "ms_per_step": round(getattr(e, attr) / 1e3 / steps, 3),
                     "share": round(getattr(e, attr) / total, 4), "calls_per_step": round(e.count / steps, 1)}
                    for e in rows]}


def release(bench: dict) -> None:
    """Free one measured configuration before the next is built in this process: its data workers,
    its GPU memory and dynamo's compiled code (each variant compiles afresh)."""
    if "batches" in bench:
        bench["batches"].close()
    bench.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def measure_variant(cfg, args, baseline: dict | None) -> tuple[dict, dict]:
    """Time ssltrain's step for cfg (and the HF baseline when `baseline` is an empty dict, which it
    fills with the baseline's measurement for later variants); returns (result, bench)."""
    bench = build_ssltrain_step(cfg)
    t = cfg.trainer
    device, model = bench["device"], bench["model"]
    flops = flops_per_token(model, t.seq_len)
    peak = peak_tflops(device, args.peak_tflops)
    runs = {"ssltrain": measure(bench["step"], args.warmup, args.steps, device)}
    if baseline is not None and not baseline:
        hf_model, hf_step = hf_baseline_step(cfg, model.config, bench["tokenizer"], bench["examples"], device,
                                             t.micro_batch_size, t.batch_size // t.micro_batch_size)
        baseline.update(measured=measure(hf_step, args.warmup, args.steps, device), flops=flops,
                        model=cfg.model.name, seq_len=t.seq_len, batch_size=t.batch_size)
        del hf_model, hf_step
    rows = {"ssltrain": rate_row(runs["ssltrain"], flops, peak)}
    if baseline:
        rows["hf_baseline"] = rate_row(baseline["measured"], baseline["flops"], peak)

    result = {
        "objective": cfg.objective._target_.rsplit(".", 1)[-1], "model": cfg.model.name,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "precision": cfg.hardware.mixed_precision, "compile": cfg.hardware.compile,
        "compile_loss": cfg.hardware.compile_loss, "seq_len": t.seq_len,
        "batch_size": t.batch_size, "micro_batch_size": t.micro_batch_size, "flops_per_token": flops, **rows,
    }
    if baseline:
        result["speedup_vs_hf"] = round(rows["ssltrain"]["tokens_per_s"] / rows["hf_baseline"]["tokens_per_s"], 3)
        if (baseline["model"], baseline["seq_len"]) != (cfg.model.name, t.seq_len):
            result["baseline_config"] = {k: baseline[k] for k in ("model", "seq_len", "batch_size")}
    if args.overhead:
        result["loop_overhead"] = loop_overhead(cfg, args.overhead_rounds, args.overhead_windows)
    if args.profile:
        result["profile"] = profile_step(bench["step"], args.profile, device, trace=args.trace)
    if args.loss:
        result["loss"] = loss_timings(t.micro_batch_size, t.seq_len, model.config.vocab_size, len(bench["tokenizer"]),
                                      device, cfg.hardware.mixed_precision)
    return result, bench


def rate_row(measured: tuple[float, float, float | None], flops: float, peak: float | None) -> dict:
    tokens_per_s, step_s, peak_gib = measured
    achieved = tokens_per_s * flops
    return {"tokens_per_s": round(tokens_per_s, 1), "step_time_ms": round(1000 * step_s, 2),
            "achieved_tflops": round(achieved / 1e12, 4),
            "mfu": round(achieved / (peak * 1e12), 4) if peak else None,
            "peak_memory_gib": round(peak_gib, 2) if peak_gib is not None else None}


def print_table(result: dict) -> None:
    runs = [name for name in ("ssltrain", "hf_baseline") if name in result]
    head = {k: v for k, v in result.items() if not isinstance(v, dict)}
    for key, value in head.items():
        print(f"{key:<16} {value}")
    print(f"\n{'':<16} " + " ".join(f"{n:>14}" for n in runs))
    for metric in result[runs[0]]:
        print(f"{metric:<16} " + " ".join(f"{str(result[n][metric]):>14}" for n in runs))
    if "loop_overhead" in result:
        print("\nloop overhead (real loop vs bare step)")
        for key, value in result["loop_overhead"].items():
            print(f"{key:<20} {value}")
    if "profile" in result:
        prof = result["profile"]
        print(f"\nprofile: self {prof['time']} time per step, {prof['total_ms_per_step']} ms in all operators")
        for row in prof["top"]:
            share, calls = 100 * row["share"], row["calls_per_step"]
            print(f"{row['ms_per_step']:>10.3f} ms {share:>6.1f}% {calls:>7} calls  {row['op']}")
    if "loss" in result:
        print("\ntoken cross-entropy alone, forward + backward")
        for key, value in result["loss"].items():
            print(f"{key:<20} {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="ssltrain config overrides")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain Hugging Face baseline")
    parser.add_argument("--json", action="store_true", help="print one JSON object (per variant) instead of a table")
    parser.add_argument("--variant", action="append", default=[], metavar="OVERRIDES",
                        help="measure ssltrain with these extra overrides (space-separated; '' for none) on top of "
                             "the positional ones, in this process; repeatable (see above)")
    parser.add_argument("--overhead", action="store_true",
                        help="also measure the real loop's overhead over the bare step (see above)")
    parser.add_argument("--loss", action="store_true",
                        help="also time the token cross-entropy alone, eager and compiled (see above)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile N steps of ssltrain's step: top operators by self time (see above)")
    parser.add_argument("--trace", default=None, metavar="FILE", help="with --profile: write the Chrome trace here")
    parser.add_argument("--overhead-rounds", type=int, default=3, help="alternations of bare step and real loop")
    parser.add_argument("--overhead-windows", type=int, default=5,
                        help="timed windows of trainer.log_every steps per round and kind")
    args = parser.parse_args()

    variants = args.variant or [""]
    cfgs = []
    for variant in variants:  # every variant composes and validates (as `ssltrain` would) before any is measured
        overrides = [*args.overrides, *variant.split()]
        try:
            preflight(overrides)
        except UserError as err:
            parser.error(one_line(str(err)) + (f" (in --variant {variant!r})" if args.variant else ""))
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        if args.loss and cfg.data.modality != "text":
            parser.error(f"--loss times the token cross-entropy of language objectives; data={cfg.data.source} "
                         f"is {cfg.data.modality}")
        cfgs.append(cfg)
    baseline = None if args.no_baseline else {}
    failed = 0
    for i, (variant, cfg) in enumerate(zip(variants, cfgs)):
        try:
            result, bench = measure_variant(cfg, args, baseline)
        except Exception as err:  # e.g. out of memory at a larger micro-batch: the other variants still run
            if len(variants) == 1:
                raise
            failed += 1
            text = str(err).strip()
            result, bench = {"error": f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:500]}, {}
        if args.variant:
            result = {"variant": variant, **result}
        if args.json:
            print(json.dumps(result), flush=True)
        elif "error" in result:
            print(f"\n{variant}: {result['error']}", flush=True)
        else:
            if i:
                print()
            print_table(result)
            sys.stdout.flush()
        # Outside the except block: its traceback no longer holds a failed variant's model and batches.
        release(bench)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
