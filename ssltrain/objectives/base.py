"""The Objective protocol: an nn.Module that owns its backbone and heads, gives a picklable
collator, and maps a batch to an ObjectiveOutput. The training loop knows nothing else.

Adding an objective = one module here + one YAML in conf/objective/ whose `_target_` names the
class; the class declares what it needs (modality, backbone attention) so that incompatible
choices fail at start with a message naming what fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from transformers.utils import ModelOutput

from ssltrain.data.blocks import build_blocks
from ssltrain.errors import ConfigError
from ssltrain.models import model_modality
from ssltrain.paths import shipped_options
from ssltrain.spec import Spec

Metric = tuple[torch.Tensor, torch.Tensor]  # (sum, count): means combine exactly over batches and ranks


@dataclass
class ObjectiveOutput(ModelOutput):
    """loss: scalar mean the optimizer minimises.
    metrics: name -> (sum, count) tensors; "loss" among them, summed over prediction targets.
    num_tokens: input tokens in the batch (for tokens/s)."""

    loss: torch.Tensor | None = None
    metrics: dict[str, Metric] | None = None
    num_tokens: torch.Tensor | None = None


class Objective(torch.nn.Module):
    #: "text" | "image": which data groups fit; "any" when the objective checks data and model itself
    #: (check_compatible) and follows data.modality (e.g. classification of texts or images).
    modality: ClassVar[str] = "text"
    #: backbone attention the task needs ("bidirectional" | "causal"), or None for any.
    attention: ClassVar[str | None] = None
    #: True when exp(mean loss) is a perplexity worth reporting.
    reports_perplexity: ClassVar[bool] = False
    #: True when every metric sums over examples (or tokens) independently of which other examples
    #: share the batch, so a held-out evaluation may end with a smaller batch and see every example.
    #: False for in-batch contrastive losses, whose value depends on the number of negatives.
    metrics_per_example: ClassVar[bool] = True
    #: True when the objective trains on the default build_examples (packed trainer.seq_len-token
    #: blocks), which is what data.streaming=true gives; False when it builds its own examples.
    streams: ClassVar[bool] = False
    #: constructor parameters (the YAML keys besides _target_) and what each may be.
    PARAMS: ClassVar[dict[str, Spec]] = {}
    #: one line for listings.
    summary: ClassVar[str] = ""

    @classmethod
    def check_params(cls, objective_cfg: DictConfig) -> None:
        params = params_of(objective_cfg)
        unknown = sorted(set(params) - set(cls.PARAMS))
        if unknown:
            raise ConfigError(
                f"objective.{unknown[0]} is not a parameter of {cls.__name__}; valid: "
                f"{', '.join(sorted(cls.PARAMS)) or '(none)'}"
            )
        for key, spec in cls.PARAMS.items():
            if key in params:
                spec.check(f"objective.{key}", params[key])

    @classmethod
    def check_compatible(cls, cfg: DictConfig) -> None:
        name = option_name(cls)
        if cfg.data.modality != cls.modality:
            raise ConfigError(
                f"{name} trains on {cls.modality} but data={cfg.data.source} gives "
                f"{cfg.data.modality}; pick {_a(cls.modality)} data group: {', '.join(compatible_data(cls.modality))}"
            )
        if model_modality(cfg.model) != cls.modality:
            raise ConfigError(
                f"{name} needs {_a(cls.modality)} model but model={cfg.model.name} is "
                f"{_a(model_modality(cfg.model))} model; pick one of: "
                f"{', '.join(compatible_models(cls.attention, cls.modality))}"
            )
        if cls.attention and cfg.model.attention != cls.attention:
            raise ConfigError(
                f"{name} needs {_a(cls.attention)} model but model={cfg.model.name} is "
                f"{cfg.model.attention}; pick one of: {', '.join(compatible_models(cls.attention, cls.modality))}"
            )

    @classmethod
    def check_launch(cls, cfg: DictConfig, world_size: int) -> None:
        """What the objective cannot do on world_size processes, as a ConfigError. Default: nothing."""

    @classmethod
    def positions_needed(cls, seq_len: int) -> int:
        """Position embeddings a seq_len-token training example uses."""
        return seq_len

    @classmethod
    def build_examples(cls, corpus, tokenizer, cfg: DictConfig, corpus_key: str, world_size: int = 1):
        """DatasetDict(train, validation) of training examples, cached; world_size is the number of
        processes the run trains on (for a split padded to whole global micro-batches). Default for text: the
        corpus tokenised once and packed into trainer.seq_len-token blocks ({"input_ids"})."""
        return build_blocks(corpus, tokenizer, cfg.trainer.seq_len, cfg.cache_dir, corpus_key,
                            num_proc=cfg.data.get("num_proc"))

    @classmethod
    def params_from_examples(cls, examples) -> dict[str, Any]:
        """Constructor keyword arguments read from the built examples (build_examples' DatasetDict),
        e.g. a classification task's label names. Default: none."""
        return {}

    def build_collator(self):
        """A picklable callable (columns: dict of numpy arrays, generator) -> batch of tensors."""
        raise NotImplementedError

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: [{"params": [...], "lr_scale": float (x optimizer.lr, default 1),
        "name": str (optional)}]; build_optimizer splits each into weight-decay / no-decay groups.
        A parameter frozen now but unfrozen later by on_step must be listed (AdamW skips parameters
        without a gradient). Default: one group of every trainable parameter."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def on_step(self, step: int, max_steps: int) -> None:
        """Called by the loop before the forward passes of optimizer step `step` (0-based, also after a
        resume), e.g. to unfreeze layers on a schedule. Must depend on (step, max_steps) only, so a
        resumed run is in the same state. Default: nothing."""

    def after_step(self, step: int, max_steps: int) -> None:
        """Called by the loop once after each applied optimizer step `step` (0-based: the step that just
        updated the weights), never for a step skipped as non-finite, e.g. to move a momentum target
        network towards the online one (BYOL). State it changes must live in registered parameters or
        buffers, so that checkpoints hold it and a resumed run continues from the same state. Default:
        nothing."""

    def derived_metrics(self, values: dict[str, float]) -> dict[str, float]:
        """Metrics computed from the reduced means (train windows and evaluations) that are not
        themselves means of sums, e.g. macro-F1 = the mean of per-class F1 values. Default: unchanged."""
        return values

    def export_model(self):
        """The transformers PreTrainedModel written to <run>/final with save_pretrained."""
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:  # pragma: no cover - abstract
        raise NotImplementedError


def option_name(cls: type) -> str:
    """How a user picks the objective class: "objective=<name>" for the shipped conf/objective/<name>.yaml
    whose _target_ names it, else "objective <ClassName>" (a class given by its _target_ alone)."""
    target = f"{cls.__module__}.{cls.__qualname__}"
    names = [name for name, option in shipped_options("objective").items() if option.get("_target_") == target]
    return f"objective={names[0]}" if names else f"objective {cls.__name__}"


def compatible_models(attention: str | None, modality: str = "text") -> list[str]:
    """Names of the shipped model configs for `modality` with the given attention (None: any)."""
    return [name for name, model in shipped_options("model").items()
            if model_modality(model) == modality and attention in (None, model.get("attention"))]


def _a(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def compatible_data(modality: str) -> list[str]:
    """Names of the shipped data groups that give `modality` examples."""
    return [name for name, data in shipped_options("data").items() if data.get("modality") == modality]


def params_of(objective_cfg: DictConfig) -> dict[str, Any]:
    return {k: v for k, v in OmegaConf.to_container(objective_cfg, resolve=True).items() if k != "_target_"}
