"""Sample efficiency of fine-tuning: what pretraining buys as labels get scarce.

A fine-tuning sweep (objective=classify) such as

    ssltrain -m +experiment=finetune_digits data.label_fraction=0.02,0.1,1.0 seed=0,1,2 \
        model.pretrained=<simclr run>/final,null hydra.sweep.dir=ft
    ssltrain-compare ft

becomes one line per initialisation: the pretrained export, named by its run (the folder holding
final/), and "random-init" (model.pretrained=null). x = labelled training examples (the run's
"start" record: train_examples, the stratified data.label_fraction subset), y = held-out accuracy
at the run's final evaluation (macro-F1 in the table and CSV), mean and a +-1 std band (population
std, as ssltrain-probe) over seeds. A config key other than the seed, the label fraction and the
init that differs between the runs of one task (objective.freeze, optimizer.lr, ...) joins the
line label, so runs that differ in it are never averaged together. One panel and one table per task
(data and model group). Only finished runs (an "end" record) count; others are listed as skipped.

Writes <out>/sample_efficiency.csv (one row per run), sample_efficiency.md (mean +- std per line and
label fraction, and each pretrained line's gain over the random-init line with the same settings)
and sample_efficiency.png. `ssltrain-compare` routes fine-tuning runs here (see compare.py).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from ssltrain.evaluation.plots import _axes, _line, _pyplot, _save
from ssltrain.objectives.classify import Classify
from ssltrain.tracking import read_records

RANDOM_INIT = "random-init"
CSV_FIELDS = ("task", "model", "init", "label", "pretrained", "freeze", "fraction", "n_labelled", "seed", "steps",
              "accuracy", "macro_f1", "run")
# Keys that never split a line: what the sweep varies on purpose (seed, label fraction, init) and
# settings that change speed or bookkeeping, never the result.
NOT_SETTINGS = ("seed", "data.label_fraction", "model.pretrained", "cache_dir", "trainer.resume", "trainer.log_every",
                "trainer.eval_every", "trainer.checkpoint_every", "trainer.keep_checkpoints", "trainer.export")


def classify_target() -> str:
    """The objective _target_ a fine-tuning run's config.yaml names."""
    return f"{Classify.__module__}.{Classify.__qualname__}"


def is_finetune_run(run_dir: Path, target: str | None = None) -> bool:
    """Whether run_dir's config.yaml trains objective=classify."""
    cfg = OmegaConf.load(Path(run_dir) / "config.yaml")
    return OmegaConf.select(cfg, "objective._target_") == (target or classify_target())


def _settings(cfg) -> dict[str, str]:
    """The resolved config as {dotted key: printable value}, without NOT_SETTINGS and hardware.*."""
    flat: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            key = prefix[:-1]
            if key not in NOT_SETTINGS and not key.startswith("hardware."):
                flat[key] = str(node) if not isinstance(node, list) else ",".join(map(str, node))

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def init_names(paths) -> dict[str, str]:
    """{model.pretrained path: its run's name}: the folder holding final/ (else the folder itself),
    with more of the path when two paths would share a name."""
    paths = list(dict.fromkeys(paths))
    parts = {p: [x for x in Path(p).parts if x not in ("/", "")] for p in paths}
    for p in paths:
        if len(parts[p]) > 1 and parts[p][-1] == "final":
            parts[p] = parts[p][:-1]
    depth = {p: 1 for p in paths}
    while True:
        names = {p: "/".join(parts[p][-depth[p]:]) for p in paths}
        clash = [p for p in paths if list(names.values()).count(names[p]) > 1 and depth[p] < len(parts[p])]
        if not clash:
            return names
        for p in clash:
            depth[p] += 1


def read_run(run_dir: Path) -> dict | None:
    """One fine-tuning run as a row (without its line label), or None when it has not finished."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    records = read_records(run_dir)
    start = next((r for r in reversed(records) if r["kind"] == "start"), None)
    end = next((r for r in reversed(records) if r["kind"] == "end"), None)
    final = next((r for r in reversed(records) if r["kind"] == "eval"), None)
    if start is None or end is None or final is None or final["step"] != end["step"]:
        return None
    f1 = final.get("macro_f1")
    return {"task": str(cfg.data.get("name") or cfg.data.source), "model": str(cfg.model.name),
            "pretrained": str(cfg.model.pretrained or ""), "freeze": str(cfg.objective.get("freeze", "none")),
            "fraction": float(cfg.data.get("label_fraction", 1.0)), "n_labelled": int(start["train_examples"]),
            "seed": int(cfg.seed), "steps": int(end["step"]), "accuracy": float(final["accuracy"]),
            "macro_f1": float("nan") if f1 is None else float(f1), "settings": _settings(cfg)}


def gather(run_dirs, root: Path | None = None, log=print) -> tuple[list[dict], list[Path]]:
    """(one row per finished fine-tuning run with its init and line label, the unfinished run dirs)."""
    rows, skipped = [], []
    for run_dir in run_dirs:
        row = read_run(Path(run_dir))
        if row is None:
            log(f"compare: skipping {run_dir}: unfinished (no final evaluation and end record)")
            skipped.append(Path(run_dir))
            continue
        row["run"] = str(Path(run_dir).relative_to(root)) if root and Path(run_dir).is_relative_to(root) else \
            str(run_dir)
        rows.append(row)
    names = init_names(r["pretrained"] for r in rows if r["pretrained"])
    for task in dict.fromkeys((r["task"], r["model"]) for r in rows):
        panel = [r for r in rows if (r["task"], r["model"]) == task]
        keys = sorted({k for r in panel for k in r["settings"]})
        varying = [k for k in keys if len({r["settings"].get(k) for r in panel}) > 1]
        short = {k: k.rsplit(".", 1)[-1] for k in varying}
        if len(set(short.values())) < len(short):
            short = {k: k for k in varying}
        for r in panel:
            r["init"] = names[r["pretrained"]] if r["pretrained"] else RANDOM_INIT
            r["extra"] = ", ".join(f"{short[k]}={r['settings'].get(k, '-')}" for k in varying)
            r["label"] = r["init"] + (f" ({r['extra']})" if r["extra"] else "")
    return rows, skipped


def lines_by_task(rows: list[dict]) -> dict[tuple[str, str], dict[str, list[dict]]]:
    """{(task, model): {line label: rows}}, pretrained lines first, then random-init, each by label."""
    panels: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for r in sorted(rows, key=lambda r: (r["init"] == RANDOM_INIT, r["label"], r["fraction"], r["seed"])):
        panels.setdefault((r["task"], r["model"]), {}).setdefault(r["label"], []).append(r)
    return panels


def _stats(rows: list[dict], fraction: float) -> tuple[float, float, float, int] | None:
    """(mean accuracy, std accuracy, mean macro-F1, runs) of the rows at one label fraction."""
    at = [r for r in rows if r["fraction"] == fraction]
    if not at:
        return None
    acc = np.array([r["accuracy"] for r in at])
    f1 = [r["macro_f1"] for r in at if math.isfinite(r["macro_f1"])]
    return float(acc.mean()), float(acc.std()), float(np.mean(f1)) if f1 else float("nan"), len(at)


def _examples(rows: list[dict], fraction: float) -> str:
    counts = sorted({r["n_labelled"] for r in rows if r["fraction"] == fraction})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def markdown(panels, out: Path, n_runs: int, skipped: list[Path]) -> str:
    lines = [f"# Sample efficiency: {n_runs} fine-tuning runs under {out.name}", "",
             "Held-out accuracy at each run's final evaluation, mean +- std over seeds (macro-F1 mean in brackets; "
             "[n] = runs in the cell when fewer than the line's most); columns: label fraction (labelled training "
             "examples). Gain: the line's mean accuracy minus the random-init line's with the same settings.", ""]
    for (task, model), by_label in panels.items():
        rows = [r for line in by_label.values() for r in line]
        fractions = sorted({r["fraction"] for r in rows})
        seeds = sorted({r["seed"] for r in rows})
        lines += [f"## {task} ({model})", "", f"Seeds: {', '.join(map(str, seeds))}.", "",
                  "| init | " + " | ".join(f"{f:g} ({_examples(rows, f)})" for f in fractions) + " |",
                  "|---" * (len(fractions) + 1) + "|"]
        for label, line in by_label.items():
            stats = [_stats(line, f) for f in fractions]
            most = max(s[3] for s in stats if s)
            cells = ["-" if s is None else f"{s[0]:.3f} +- {s[1]:.3f} ({s[2]:.3f})" + (f" [{s[3]}]" if s[3] < most
                                                                                     else "") for s in stats]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        for label, line in by_label.items():
            if line[0]["init"] == RANDOM_INIT:
                continue
            base = next((ln for ln in by_label.values()
                         if ln[0]["init"] == RANDOM_INIT and ln[0]["extra"] == line[0]["extra"]), None)
            if base is None:
                continue
            gains = [(_stats(line, f), _stats(base, f)) for f in fractions]
            cells = ["-" if a is None or b is None else f"{a[0] - b[0]:+.3f}" for a, b in gains]
            lines.append(f"| *gain: {label} vs {base[0]['label']}* | " + " | ".join(cells) + " |")
        lines.append("")
    if skipped:
        lines += [f"Skipped {len(skipped)} unfinished runs: " + ", ".join(p.name for p in skipped), ""]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for k in ("fraction", "accuracy", "macro_f1"):
            row[k] = float(row[k])
        for k in ("n_labelled", "seed", "steps"):
            row[k] = int(row[k])
    return rows


def plot_sample_efficiency(panels, path: Path, title: str = "") -> Path:
    """Held-out accuracy vs labelled examples (log x), one panel per task, one line per init and
    settings, mean over seeds with a +-1 std band. random-init lines are dashed; when the settings
    vary (freeze modes) and one pretrained init faces random-init, a colour per setting pairs them."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, ((task, model), by_label) in zip(axes[0], panels.items()):
        firsts = [rows[0] for rows in by_label.values()]
        by_setting = len({r["extra"] for r in firsts}) > 1 and len({r["init"] for r in firsts} - {RANDOM_INIT}) <= 1
        colours = list(dict.fromkeys(r["extra"] if by_setting else r["label"] for r in firsts))
        for label, rows in by_label.items():
            colour = f"C{colours.index(rows[0]['extra'] if by_setting else label) % 10}"
            _line(ax, rows, label, colour, "--" if rows[0]["init"] == RANDOM_INIT else "-")
        _axes(ax, f"fine-tuning on {task} ({model})", "labelled training examples (log)")
    return _save(plt, fig, path, title)


def sample_efficiency(run_dirs, out_dir: str | Path, log=print) -> dict:
    """Gather fine-tuning runs into <out_dir>/sample_efficiency.{csv,md,png}.

    Returns {"rows", "skipped", "csv", "md", "png"} (png None when no run finished)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, skipped = gather(run_dirs, out.resolve(), log)
    panels = lines_by_task(rows)
    ordered = [r for by_label in panels.values() for line in by_label.values() for r in line]
    csv_path, md_path = out / "sample_efficiency.csv", out / "sample_efficiency.md"
    write_csv(ordered, csv_path)
    md_path.write_text(markdown(panels, out, len(rows), skipped))
    png_path = None
    if panels:
        png_path = plot_sample_efficiency(panels, out / "sample_efficiency.png",
                                          title=f"{len(rows)} fine-tuning runs under {out.name}")
    return {"rows": ordered, "skipped": skipped, "csv": csv_path, "md": md_path, "png": png_path}
