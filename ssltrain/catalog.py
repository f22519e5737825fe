"""`ssltrain-list`: every objective with one line on what it is and which model and data
groups fit it, read from conf/ and the objective classes themselves (nothing hard-coded)."""

from __future__ import annotations

import sys

from omegaconf import OmegaConf

from ssltrain.errors import ConfigError, UserError
from ssltrain.objectives import objective_class
from ssltrain.paths import shipped_options


def _fits(cls, model_cfg, data_cfg) -> bool:
    try:
        cls.check_compatible(OmegaConf.create({"model": model_cfg, "data": data_cfg}))
    except ConfigError:
        return False
    except Exception:  # a check that needs more of the config than model + data: do not claim a fit
        return False
    return True


def catalog() -> list[dict]:
    """[{name, target, summary, modality, models, data}] for every conf/objective/*.yaml."""
    models, data = shipped_options("model"), shipped_options("data")
    rows = []
    for name, cfg in shipped_options("objective").items():
        try:
            cls = objective_class(cfg)
        except UserError as err:
            rows.append({"name": name, "target": cfg.get("_target_"), "summary": f"(broken: {err})",
                         "modality": "?", "models": [], "data": []})
            continue
        pairs = [(m, d) for m in models for d in data if _fits(cls, models[m], data[d])]
        rows.append({
            "name": name, "target": cfg.get("_target_"), "summary": cls.summary or (cls.__doc__ or "").strip(),
            "modality": cls.modality,
            "models": sorted({m for m, _ in pairs}), "data": sorted({d for _, d in pairs}),
        })
    return rows


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ssltrain objectives (ssltrain objective=<name> model=<model> data=<data>)")
    for column in ("objective", "what it is", "models that fit", "data that fit"):
        table.add_column(column, overflow="fold")
    for row in catalog():
        table.add_row(row["name"], row["summary"], ", ".join(row["models"]), ", ".join(row["data"]))
    Console(width=max(120, Console().width)).print(table)
    hardware = ", ".join(shipped_options("hardware"))
    print(f"hardware groups: {hardware}", file=sys.stdout)


if __name__ == "__main__":
    main()
