"""Evaluate an objective on the held-out split: the same metrics the objective trains with,
summed as (sum, count) over batches and processes so means are exact, plus perplexity."""

from __future__ import annotations

import math

import torch

from ssltrain.data.loader import BatchDataset


def reduce_metrics(sums: dict[str, list[torch.Tensor]], accelerator, reports_perplexity: bool) -> dict[str, float]:
    """{name: [sum, count]} accumulated on this rank -> {name: global mean} (one all-reduce)."""
    if not sums:
        return {}
    names = sorted(sums)
    stacked = torch.stack([torch.stack([sums[n][0].float(), sums[n][1].float()]) for n in names])  # (M, 2)
    stacked = accelerator.reduce(stacked.to(accelerator.device), reduction="sum").cpu().double()
    values = {n: s / c if c > 0 else float("nan") for n, (s, c) in zip(names, stacked.tolist())}
    if reports_perplexity and "loss" in values:
        values["perplexity"] = math.exp(min(values["loss"], 50.0))
    return values


def accumulate(sums: dict[str, list[torch.Tensor]], metrics: dict) -> None:
    for name, (total, count) in metrics.items():
        total, count = total.detach().float(), count.detach().float()
        if name in sums:
            sums[name][0] += total
            sums[name][1] += count
        else:
            sums[name] = [total.clone(), count.clone()]


@torch.no_grad()
def evaluate(objective, examples, collator, *, micro_batch_size: int, max_batches: int | None, seed: int,
             accelerator) -> dict[str, float]:
    """Mean metrics over the first max_batches held-out micro-batches (fixed order and masking,
    so successive evaluations are comparable); max_batches None: every example, the last batch
    smaller, unless the objective's metrics depend on the batch (in-batch contrastive losses:
    then full batches only). Collective: every rank calls it."""
    world, rank = accelerator.num_processes, accelerator.process_index
    unwrapped = accelerator.unwrap_model(objective)
    batch_size = max(1, min(micro_batch_size, len(examples) // world))
    dataset = BatchDataset(examples, collator, batch_size, seed=seed, epoch=0, rank=rank, world_size=world,
                           shuffle=False, drop_last=not type(unwrapped).metrics_per_example)
    n_batches = len(dataset) if max_batches is None else min(len(dataset), max_batches)
    was_training = objective.training
    objective.eval()
    sums: dict[str, list[torch.Tensor]] = {}
    for b in range(n_batches):
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in dataset[b].items()}
        metrics = objective(batch).metrics
        if not dataset.is_filler(b):
            accumulate(sums, metrics)
    objective.train(was_training)
    return reduce_metrics(sums, accelerator, type(unwrapped).reports_perplexity)
