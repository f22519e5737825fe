"""What a config value may be (Spec) and how a dotted key is read (select). A leaf: it imports
nothing of ssltrain but errors, so that config, data, models and objectives can all declare their
parameters without importing one another."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from ssltrain.errors import ConfigError

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


@dataclass(frozen=True)
class Spec:
    """What one config value may be: a type, an optional closed/open range, or a set of choices."""

    kind: type = str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: value must be > low, not >= low
    choices: tuple | None = None
    nullable: bool = False

    def describe(self) -> str:
        if self.choices is not None:
            text = "one of " + ", ".join(str(c) for c in self.choices)
        else:
            text = _TYPE_NAMES.get(self.kind, self.kind.__name__)
            if self.low is not None and self.high is not None:
                text += f" in {'(' if self.low_open else '['}{self.low}, {self.high}]"
            elif self.low is not None:
                text += f" {'>' if self.low_open else '>='} {self.low}"
        return text + (" or null" if self.nullable else "")

    def check(self, key: str, value: Any) -> None:
        if value is None:
            if self.nullable:
                return
            raise ConfigError(f"{key} is null; expected {self.describe()}")
        if not self._type_ok(value) or not self._range_ok(value):
            raise ConfigError(f"{key}={value!r} is invalid; expected {self.describe()}")

    def _type_ok(self, value: Any) -> bool:
        if self.choices is not None:
            return True
        if self.kind is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if self.kind is int:
            return isinstance(value, int) and not isinstance(value, bool)
        return isinstance(value, self.kind)

    def _range_ok(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high


POSITIVE = Spec(int, low=1)
NON_NEGATIVE = Spec(int, low=0)
PROBABILITY = Spec(float, low=0.0, high=1.0)


def select(cfg: DictConfig, key: str) -> Any:
    """cfg value at a dotted key; a required (???) value that was not given is a ConfigError."""
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except MissingMandatoryValue as err:
        key = err.full_key or key  # "data.paths" even when cfg is the data node
        raise ConfigError(f"{key} is required: pass it on the command line as {key}=...") from None
