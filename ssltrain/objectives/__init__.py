"""Pretext objectives. Each is one module + one YAML (conf/objective/<name>.yaml) whose
`_target_` names the class; nothing else needs to change to add one."""

from __future__ import annotations

from omegaconf import DictConfig

from ssltrain.errors import DEBUG_ENV, ConfigError
from ssltrain.objectives.base import Objective, ObjectiveOutput, params_of

__all__ = ["Objective", "ObjectiveOutput", "build_objective", "objective_class"]


def objective_class(objective_cfg: DictConfig) -> type[Objective]:
    from hydra.utils import get_class

    target = objective_cfg.get("_target_")
    if not target:
        raise ConfigError("objective has no _target_ naming its class (e.g. ssltrain.objectives.mlm.MaskedLM)")
    try:
        cls = get_class(target)
    except Exception as err:  # importing the class runs its module: a bug there may raise anything
        cause = err.__cause__ or err  # hydra wraps the module's own error in an ImportError
        raise ConfigError(f"objective._target_={target!r} cannot be imported: {type(cause).__name__}: "
                          f"{str(cause).strip() or '(no message)'} ({DEBUG_ENV}=1 shows the traceback)") from err
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise ConfigError(f"objective._target_={target!r} is not an ssltrain Objective subclass")
    return cls


def build_objective(cfg: DictConfig, tokenizer, examples=None) -> Objective:
    """The configured objective; `examples` (build_examples' DatasetDict) supplies what the class reads
    from the data (Objective.params_from_examples, e.g. label names)."""
    cls = objective_class(cfg.objective)
    from_examples = cls.params_from_examples(examples) if examples is not None else {}
    return cls(model_cfg=cfg.model, tokenizer=tokenizer, hardware=cfg.hardware, **from_examples,
               **params_of(cfg.objective))
