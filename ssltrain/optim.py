"""AdamW with decoupled weight decay on matrices only, and a transformers LR schedule."""

from __future__ import annotations

import torch
from omegaconf import DictConfig


def build_optimizer(model: torch.nn.Module, opt_cfg: DictConfig, fused: bool = False) -> torch.optim.AdamW:
    """Weight decay on >=2-D weights (linear, embedding); none on biases and norm scales.

    The parameters come from model.param_groups() when the model has one (every Objective: default all
    trainable parameters; fine-tuning: head and backbone layer groups), each group at optimizer.lr x its
    "lr_scale"; otherwise every trainable parameter at optimizer.lr."""
    if hasattr(model, "param_groups"):
        specs = model.param_groups()
    else:
        specs = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    groups = []
    for spec in specs:
        params = list(spec["params"])
        settings = {"lr": opt_cfg.lr * spec.get("lr_scale", 1.0), **({"name": spec["name"]} if "name" in spec else {})}
        groups += [{"params": [p for p in params if p.ndim >= 2], "weight_decay": opt_cfg.weight_decay, **settings},
                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, **settings}]
    extra = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=opt_cfg.lr, betas=tuple(opt_cfg.betas), eps=opt_cfg.eps, **extra)


def build_scheduler(optimizer: torch.optim.Optimizer, opt_cfg: DictConfig, max_steps: int):
    """Linear warm-up to lr over warmup_ratio x max_steps, then the named decay (cosine, linear, ...) to max_steps.
    Stepped once per optimizer step; its state_dict is saved in checkpoints."""
    from transformers import get_scheduler

    return get_scheduler(opt_cfg.scheduler, optimizer, num_warmup_steps=round(opt_cfg.warmup_ratio * max_steps),
                         num_training_steps=max_steps)
