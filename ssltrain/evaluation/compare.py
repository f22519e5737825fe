"""Compare pretraining runs side by side: `ssltrain-compare DIR [DIR ...]`.

Every run directory under the DIRs (a folder holding metrics.jsonl and config.yaml, e.g. the
jobs of `ssltrain -m objective=mlm,electra hydra.sweep.dir=DIR`) becomes a row: objective,
model, data, steps, final held-out loss / perplexity / masked-token accuracy (the objective's own
accuracy where it has no masked tokens), linear-probe accuracy on its downstream task at each
label fraction (read from <run>/downstream/probe.csv when it covers them, else computed now and
saved there), held-out BLEU for span-corruption runs, train wall time and tokens seen. The
random-init encoder of each model shape (and the raw-pixel / TF-IDF baseline) get rows of their
own. Writes <DIR>/comparison.md and <DIR>/comparison.png (linear-probe accuracy vs label
fraction, one line per run).

Fine-tuning runs (objective=classify in config.yaml) are not pretraining runs: they go to
ssltrain/evaluation/curves.py instead, which writes <DIR>/sample_efficiency.{csv,md,png} (held-out
accuracy vs labelled examples, pretrained vs random-init); a directory may hold both kinds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from ssltrain.errors import UserError
from ssltrain.paths import shipped_options
from ssltrain.tracking import read_records

COMPARE_FRACTIONS = (0.01, 0.02, 0.1, 1.0)
COMPARE_SEEDS = (0, 1, 2)


def find_runs(dirs) -> list[Path]:
    """Run directories (metrics.jsonl + config.yaml) at or under each of dirs, in path order."""
    runs = []
    for d in dirs:
        d = Path(d).expanduser().resolve()
        if not d.is_dir():
            raise UserError(f"{d} is not a directory")
        found = [p.parent for p in sorted(d.rglob("metrics.jsonl"))
                 if (p.parent / "config.yaml").is_file() and "checkpoints" not in p.parent.relative_to(d).parts]
        runs.extend(r for r in found if r not in runs)
    return runs


def objective_name(run_dir: Path, cfg) -> str:
    """Hydra's recorded choice (objective=...), else the conf/objective/*.yaml with this _target_."""
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if hydra_file.is_file():
        choice = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.choices.objective")
        if choice:
            return str(choice)
    target = cfg.objective.get("_target_")
    for name, option in shipped_options("objective").items():
        if option.get("_target_") == target:
            return name
    return str(target).rsplit(".", 1)[-1]


def pretext_accuracy(eval_record: dict) -> tuple[str, float] | None:
    """The objective's masked-token accuracy (masked_acc, ELECTRA's generator gen_acc), else its own accuracy."""
    for key in ("masked_acc", "gen_acc"):
        if key in eval_record:
            return key, eval_record[key]
    accs = sorted(k for k in eval_record if k.endswith("acc") and isinstance(eval_record[k], (int, float)))
    return (accs[0], eval_record[accs[0]]) if accs else None


def run_summary(run_dir: Path) -> dict:
    cfg = OmegaConf.load(run_dir / "config.yaml")
    records = read_records(run_dir)
    evals = [r for r in records if r["kind"] == "eval"]
    start = next((r for r in records if r["kind"] == "start"), None)
    end = next((r for r in reversed(records) if r["kind"] == "end"), None)
    bleu = next((r["bleu"] for r in reversed(records) if r["kind"] == "downstream" and "bleu" in r), None)
    final = evals[-1] if evals else {}
    return {
        "run_dir": run_dir, "name": run_dir.name, "objective": objective_name(run_dir, cfg),
        "model": cfg.model.name, "data": cfg.data.get("name") or cfg.data.source, "cfg": cfg,
        "steps": end["step"] if end else (records[-1]["step"] if records else 0), "finished": end is not None,
        "loss": final.get("loss"), "perplexity": final.get("perplexity"), "pretext_acc": pretext_accuracy(final),
        "wall_s": (end["time"] - start["time"]) if (start and end) else None,
        "tokens_seen": end.get("tokens_seen") if end else None, "bleu": bleu,
        "has_export": (run_dir / "final" / "config.json").is_file(),
    }


def probe_rows(run: dict, fractions, seeds, log=print) -> list[dict]:
    """The run's linear-probe rows: from <run>/downstream/probe.csv if it holds the pretrained and
    random-init lines at every fraction, else computed now (and saved there)."""
    from ssltrain.evaluation.probe import probe_model, read_csv  # local: keeps `ssltrain-compare --help` fast

    csv_path = run["run_dir"] / "downstream" / "probe.csv"
    if csv_path.is_file():
        rows = [r for r in read_csv(csv_path) if r["probe"] == "linear"]
        have = {(r["init"], r["fraction"]) for r in rows}
        if all((init, float(f)) in have for init in ("pretrained", "random-init") for f in fractions):
            return [r for r in rows if r["fraction"] in {float(f) for f in fractions}]
    log(f"compare: probing {run['run_dir']}")
    return probe_model(run["run_dir"], fractions=fractions, seeds=seeds, probes=("linear",), log=log)["rows"]


def _fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _tokens(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def _probe_cells(rows: list[dict], fractions) -> list[str]:
    import numpy as np

    cells = []
    for f in fractions:
        accs = [r["accuracy"] for r in rows if r["fraction"] == float(f)]
        cells.append(f"{np.mean(accs):.3f} +- {np.std(accs):.3f}" if accs else "-")
    return cells


def compare_runs(dirs, *, fractions=COMPARE_FRACTIONS, seeds=COMPARE_SEEDS, probe: bool = True, bleu: bool = True,
                 out_dir: str | Path | None = None, log=print) -> dict:
    """Build the comparison of every run under dirs. Returns {"runs", "md", "png", "table"}."""
    run_dirs = find_runs(dirs)
    if not run_dirs:
        raise UserError(f"no run directories (metrics.jsonl + config.yaml) under {', '.join(map(str, dirs))}")
    from ssltrain.evaluation.curves import (  # local: keeps `ssltrain-compare --help` fast
        is_finetune_run,
        sample_efficiency,
    )

    out = Path(out_dir) if out_dir else Path(dirs[0]).expanduser().resolve()
    finetune = [r for r in run_dirs if is_finetune_run(r)]
    curves = sample_efficiency(finetune, out, log) if finetune else None
    run_dirs = [r for r in run_dirs if r not in finetune]
    if not run_dirs:  # a fine-tuning sweep: its sample-efficiency curves are the comparison
        return {"runs": [], "md": None, "png": None, "table": None, "sample_efficiency": curves}
    runs = [run_summary(r) for r in run_dirs]
    fractions = sorted(float(f) for f in fractions)
    lines: dict[str, list[dict]] = {}
    baselines: dict[tuple, tuple[str, list[dict]]] = {}
    for run in runs:
        run["probe"] = []
        if probe and run["has_export"]:
            rows = probe_rows(run, fractions, seeds, log)
            run["probe"] = [r for r in rows if r["init"] == "pretrained"]
            run["task"] = rows[0]["task"] if rows else None
            lines[f"{run['objective']} ({run['model']})"] = run["probe"]
            for init in dict.fromkeys(r["init"] for r in rows if r["init"] != "pretrained"):
                label = f"{init} ({run['model']})" if init == "random-init" else init
                baselines.setdefault((run["task"], label), (label, [r for r in rows if r["init"] == init]))
        if bleu and run["has_export"] and run["bleu"] is None and "noise_density" in run["cfg"].objective:
            from ssltrain.evaluation.generation import (  # local: keeps `ssltrain-compare --help` fast
                record_bleu,
                span_corruption_bleu,
            )

            result = span_corruption_bleu(run["run_dir"])
            record_bleu(run["run_dir"], result)
            run["bleu"] = result["bleu"]
    for label, rows in baselines.values():
        lines.setdefault(label, rows)

    header = ["run", "objective", "model", "data", "steps", "held-out loss", "perplexity", "masked-token acc",
              "probe task", *[f"linear probe @{f:g}" for f in fractions], "BLEU", "wall time", "tokens seen"]
    table = []
    for run in runs:
        acc = run["pretext_acc"]
        acc_cell = "-" if acc is None else f"{acc[1]:.3f}" + ("" if acc[0] == "masked_acc" else f" ({acc[0]})")
        table.append([run["name"], run["objective"], run["model"], str(run["data"]),
                      str(run["steps"]) + ("" if run["finished"] else " (unfinished)"), _fmt(run["loss"], ".3f"),
                      _fmt(run["perplexity"], ".4g"), acc_cell, run.get("task") or "-",
                      *(_probe_cells(run["probe"], fractions) if run["probe"] else ["-"] * len(fractions)),
                      _fmt(run["bleu"], ".2f"), _duration(run["wall_s"]), _tokens(run["tokens_seen"])])
    for (task, label), (_, rows) in baselines.items():
        table.append([f"*{label}*", "-", "-", "-", "-", "-", "-", "-", task, *_probe_cells(rows, fractions),
                      "-", "-", "-"])

    out.mkdir(parents=True, exist_ok=True)
    md = [f"# Comparison of {len(runs)} runs", "",
          f"Held-out metrics at each run's last evaluation; linear probe: test accuracy mean +- std over seeds "
          f"{', '.join(map(str, seeds))} at each label fraction (ssltrain-probe); wall time from the run's start "
          f"record to its end record.", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in table]
    md_path = out / "comparison.md"
    md_path.write_text("\n".join(md) + "\n")
    png_path = None
    if lines:
        from ssltrain.evaluation.plots import plot_comparison  # local: keeps `ssltrain-compare --help` fast

        png_path = plot_comparison(lines, out / "comparison.png", title=f"{len(runs)} runs under {out.name}")
    return {"runs": runs, "md": md_path, "png": png_path, "table": [header, *table], "sample_efficiency": curves}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ssltrain-compare", description="Gather run directories (e.g. a sweep's) "
                                     "into DIR/comparison.md and DIR/comparison.png; fine-tuning runs "
                                     "(objective=classify) into DIR/sample_efficiency.{csv,md,png}.")
    parser.add_argument("dirs", nargs="+", help="sweep or run directories (searched recursively)")
    parser.add_argument("--fractions", nargs="+", default=[",".join(map(str, COMPARE_FRACTIONS))],
                        help="label fractions of the linear probe (default: %(default)s)")
    parser.add_argument("--seeds", nargs="+", default=[",".join(map(str, COMPARE_SEEDS))],
                        help="probe seeds (default: %(default)s)")
    parser.add_argument("--no-probe", action="store_true", help="pretraining metrics only")
    parser.add_argument("--no-bleu", action="store_true", help="skip BLEU of span-corruption runs")
    parser.add_argument("--out", default=None, help="output folder (default: the first DIR)")
    args = parser.parse_args(argv)
    from ssltrain.evaluation.probe import split_values  # local: keeps `ssltrain-compare --help` fast

    fractions, seeds = split_values(args.fractions, float), split_values(args.seeds, int)
    try:
        result = compare_runs(args.dirs, fractions=fractions, seeds=seeds, probe=not args.no_probe,
                              bleu=not args.no_bleu, out_dir=args.out, log=lambda m: print(m, file=sys.stderr))
    except UserError as err:
        print(f"ssltrain-compare: error: {err}", file=sys.stderr)
        return 2
    if result["md"]:
        print(result["md"].read_text())
        print(f"wrote {result['md']}" + (f" and {result['png']}" if result["png"] else ""))
    curves = result["sample_efficiency"]
    if curves:
        print(curves["md"].read_text())
        print(f"wrote {curves['csv']}, {curves['md']}" + (f" and {curves['png']}" if curves["png"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
