"""Quick probes on frozen features, and how they scale with the number of labels.

`ssltrain-probe <run dir | model folder> [--task ...] [--fractions ...] [--seeds ...]`

For each feature source ("init") — the pretrained encoder, a random-init encoder of the same
config (fresh weights per seed), and the baseline a practitioner checks first (raw pixels for
images, TF-IDF for text) — and each label fraction and seed, a stratified seeded subset of the
task's train pool is labelled (at least one example per class; subsets grow nested with the
fraction), and two probes are fitted on it and scored on the fixed test split:

  linear  features standardised with the train pool's statistics (labels unused; TF-IDF is
          already row-normalised), then multinomial logistic regression whose L2 strength C is
          picked from C_GRID by stratified cross-validation on the labelled subset (fixed
          C_DEFAULT when a class has a single example)
  knn     cosine k-NN (k = min(K, labelled examples), votes weighted by similarity) on the same features

Writes to <run>/downstream/ (or --out): probe.csv (one row per init x probe x fraction x seed:
accuracy, macro-F1), probe.png (accuracy vs labelled examples, log x, mean and a +-1 std band
over seeds) and probe.md (mean +- std tables); appends "probe" records to the run's
metrics.jsonl and TensorBoard (step = labelled examples).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

from ssltrain.data.labelled import stratified_subset as subset
from ssltrain.errors import UserError
from ssltrain.evaluation.features import TEXT_POOLINGS, image_features, load_encoder, text_features
from ssltrain.evaluation.plots import plot_probe_curves
from ssltrain.evaluation.records import append_records
from ssltrain.evaluation.tasks import default_task, load_task, locate
from ssltrain.hub import load_tokenizer

DEFAULT_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 1.0)
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
PROBES = ("linear", "knn")
BASELINES = {"image": "raw-pixels", "text": "tf-idf"}
C_GRID = (0.01, 0.1, 1.0, 10.0)
C_DEFAULT = 1.0
KNN_K = 5
CSV_FIELDS = ("task", "init", "probe", "fraction", "n_labelled", "seed", "accuracy", "macro_f1", "C")


# ---------------------------------------------------------------- label fractions


def stratified_subset(labels: np.ndarray, fraction: float, seed: int, min_per_class: int = 1) -> np.ndarray:
    """ssltrain.data.labelled.stratified_subset (the subsets `data.label_fraction` fine-tunes on),
    with the fraction checked: seeded, stratified, every class present, nested as the fraction grows."""
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"label fraction {fraction} is not in (0, 1]")
    return subset(labels, fraction, seed, min_per_class)


# ---------------------------------------------------------------- probes


def _scores(y_true, y_pred) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0))}


def linear_probe(train_x, train_y, test_x, test_y, *, seed: int = 0, c_grid=C_GRID) -> dict[str, float]:
    """Logistic regression on (already scaled) features; C by stratified CV when every class has 2+
    examples. Returns {"accuracy", "macro_f1", "C"}."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    def model(c=C_DEFAULT):
        return LogisticRegression(C=c, max_iter=3000, random_state=seed)

    smallest = int(np.bincount(train_y)[np.unique(train_y)].min())
    if len(c_grid) == 1:
        clf, c = model(c_grid[0]).fit(train_x, train_y), float(c_grid[0])
    elif smallest >= 2:
        folds = StratifiedKFold(n_splits=min(5, smallest), shuffle=True, random_state=seed)
        search = GridSearchCV(model(), {"C": list(c_grid)}, cv=folds, scoring="accuracy", n_jobs=1)
        search.fit(train_x, train_y)
        clf, c = search.best_estimator_, float(search.best_params_["C"])
    else:
        clf, c = model().fit(train_x, train_y), C_DEFAULT
    return {**_scores(test_y, clf.predict(test_x)), "C": c}


def knn_probe(train_x, train_y, test_x, test_y, *, k: int = KNN_K) -> dict[str, float]:
    """Cosine k-NN with similarity-weighted votes. Returns {"accuracy", "macro_f1", "C": nan}."""
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=min(k, len(train_y)), metric="cosine", weights="distance")
    clf.fit(train_x, train_y)
    return {**_scores(test_y, clf.predict(test_x)), "C": float("nan")}


# ---------------------------------------------------------------- features per init


def scaled(train, test):
    """Standardise with the train pool's mean and std (no labels involved)."""
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 1e-8, std, 1.0)
    return (train - mean) / std, (test - mean) / std


def feature_sets(task, location, init: str, seed: int, *, pooling: str = "mean", max_length: int = 128):
    """(train features, test features) for one init ("pretrained", "random-init", "raw-pixels", "tf-idf")."""
    if init == "raw-pixels":
        if task.modality != "image":
            raise UserError("init raw-pixels needs an image task")
        flat = [np.asarray(x, dtype=np.float32).reshape(len(x), -1) for x in (task.train_inputs, task.test_inputs)]
        return scaled(*flat)
    if init == "tf-idf":
        if task.modality != "text":
            raise UserError("init tf-idf needs a text task")
        from sklearn.feature_extraction.text import TfidfVectorizer

        vectorizer = TfidfVectorizer(sublinear_tf=True, min_df=2)  # fitted on the train pool's text, no labels
        return vectorizer.fit_transform(task.train_inputs), vectorizer.transform(task.test_inputs)
    encoder = load_encoder(location.model_dir, init, seed)
    if task.modality == "image":
        return scaled(image_features(encoder, task.train_inputs), image_features(encoder, task.test_inputs))
    tokenizer = load_tokenizer(location.model_dir)
    return scaled(*(text_features(encoder, tokenizer, x, max_length, pooling)
                    for x in (task.train_inputs, task.test_inputs)))


# ---------------------------------------------------------------- the sweep


def probe_model(path, *, task: str | None = None, fractions=DEFAULT_FRACTIONS, seeds=DEFAULT_SEEDS,
                inits: list[str] | None = None, probes=PROBES, pooling: str = "mean", max_length: int = 128,
                out_dir: str | Path | None = None, record: bool = True, plot: bool = True, log=print) -> dict:
    """Probe a run directory or model folder over inits x probes x fractions x seeds.

    Returns {"rows": [CSV rows], "csv", "png", "md": paths, "out_dir", "task", "summary": {(init, probe,
    fraction): (mean acc, std acc, mean macro-F1, n_labelled)}}.
    """
    location = locate(path)
    task_name = task or default_task(location)
    started = time.perf_counter()
    labelled = load_task(task_name, location)
    inits = list(inits or ("pretrained", "random-init", BASELINES[labelled.modality]))
    for probe in probes:
        if probe not in PROBES:
            raise UserError(f"probe {probe!r} is not one of {', '.join(PROBES)}")
    fractions = sorted({float(f) for f in fractions})
    subsets = {(f, s): stratified_subset(labelled.train_labels, f, s) for f in fractions for s in seeds}
    from threadpoolctl import threadpool_limits

    # One BLAS/OpenMP thread: these fits are small, and on a busy machine more threads spin-wait
    # (a 1,600 x 128 logistic regression took 10 s with 2 threads on a loaded 2-core box, 0.2 s with 1).
    with threadpool_limits(limits=1):
        rows = _probe_grid(labelled, location, task_name, inits, probes, fractions, seeds, subsets, pooling,
                           max_length, started, log)
    out = Path(out_dir) if out_dir else (location.run_dir or location.model_dir) / "downstream"
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "probe.csv"
    write_csv(rows, csv_path)
    summary = summarise(rows)
    md_path = out / "probe.md"
    md_path.write_text(summary_markdown(summary, task_name, location, seeds))
    png_path = out / "probe.png" if plot else None
    if plot:
        plot_probe_curves(rows, png_path, title=f"{location.name}: {task_name}")
    if record and location.run_dir is not None and (location.run_dir / "metrics.jsonl").is_file():
        record_summary(location.run_dir, task_name, summary, len(seeds))
    return {"rows": rows, "csv": csv_path, "png": png_path, "md": md_path, "out_dir": out, "task": task_name,
            "summary": summary, "seconds": time.perf_counter() - started}


def _probe_grid(labelled, location, task_name, inits, probes, fractions, seeds, subsets, pooling, max_length,
                started, log) -> list[dict]:
    rows, cache = [], {}
    for init in inits:
        seeded = init == "random-init"  # the only init whose features depend on the seed
        features = None
        for seed in seeds:
            if features is None or seeded:
                features = feature_sets(labelled, location, init, seed, pooling=pooling, max_length=max_length)
            train_x, test_x = features
            for fraction in fractions:
                idx = subsets[(fraction, seed)]
                for probe in probes:
                    key = (init, probe, seed if seeded else None, idx.tobytes())
                    if key not in cache:  # the 100% subset is the same for every seed
                        args = (train_x[idx], labelled.train_labels[idx], test_x, labelled.test_labels)
                        cache[key] = linear_probe(*args, seed=seed) if probe == "linear" else knn_probe(*args)
                    rows.append({"task": task_name, "init": init, "probe": probe, "fraction": fraction,
                                 "n_labelled": len(idx), "seed": seed, **cache[key]})
        log(f"probe: {init} done ({time.perf_counter() - started:.0f} s)")
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in CSV_FIELDS})


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for k in ("fraction", "accuracy", "macro_f1", "C"):
            row[k] = float(row[k])
        row["n_labelled"], row["seed"] = int(row["n_labelled"]), int(row["seed"])
    return rows


def summarise(rows: list[dict]) -> dict:
    """{(init, probe, fraction): (mean acc, std acc, mean macro-F1, mean n_labelled)} (population std over seeds)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["init"], row["probe"], row["fraction"]), []).append(row)
    return {key: (float(np.mean([r["accuracy"] for r in g])), float(np.std([r["accuracy"] for r in g])),
                  float(np.mean([r["macro_f1"] for r in g])), float(np.mean([r["n_labelled"] for r in g])))
            for key, g in groups.items()}


def summary_markdown(summary: dict, task: str, location, seeds) -> str:
    fractions = sorted({k[2] for k in summary})
    lines = [f"# Probes: {location.name} on {task}", "",
             f"Model: `{location.model_dir}`; {len(seeds)} seeds ({', '.join(map(str, seeds))}); accuracy mean +- std "
             f"over seeds (macro-F1 mean in brackets).", ""]
    for probe in dict.fromkeys(k[1] for k in summary):
        header = " | ".join(f"{f:g} ({summary_n(summary, f)})" for f in fractions)
        lines += [f"## {probe} probe", "", f"| init \\ label fraction (examples) | {header} |",
                  "|---" * (len(fractions) + 1) + "|"]
        for init in dict.fromkeys(k[0] for k in summary):
            cells = [f"{m:.3f} +- {s:.3f} ({f1:.3f})" for m, s, f1, _ in
                     (summary[(init, probe, f)] for f in fractions)]
            lines.append(f"| {init} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def summary_n(summary: dict, fraction: float) -> int:
    return int(round(next(v[3] for k, v in summary.items() if k[2] == fraction)))


def record_summary(run_dir: Path, task: str, summary: dict, n_seeds: int) -> None:
    """One "probe" record per (init, probe, fraction) in metrics.jsonl; TensorBoard scalars
    probe/<task>/<probe>/<init>/accuracy at step = labelled examples."""
    records = [{"task": task, "init": init, "probe": probe, "fraction": fraction, "n_labelled": round(n),
                "accuracy": mean, "accuracy_std": std, "macro_f1": f1, "seeds": n_seeds}
               for (init, probe, fraction), (mean, std, f1, n) in summary.items()]
    scalars = [(f"probe/{r['task']}/{r['probe']}/{r['init']}/accuracy", r["accuracy"], r["n_labelled"])
               for r in records]
    append_records(run_dir, "probe", records, scalars)


# ---------------------------------------------------------------- command line


def split_values(values: list[str], kind=str) -> list:
    """Command-line values given space- and/or comma-separated ("0.1,1.0" "0.5") -> one flat list of kind."""
    return [kind(v) for value in values for v in value.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ssltrain-probe", description="Linear and k-NN probes on frozen features vs label fraction: "
        "pretrained vs random-init encoder vs raw pixels / TF-IDF; writes <run>/downstream/probe.{csv,png,md}.")
    parser.add_argument("path", help="a run directory (with final/) or a model folder (a run's final/, any HF "
                                     "checkpoint)")
    parser.add_argument("--task", choices=("digits", "run_data", "docs_topics"),
                        help="default: docs_topics for text models, digits for image models (run_data for image "
                             "runs on other labelled data)")
    parser.add_argument("--fractions", nargs="+", default=[",".join(map(str, DEFAULT_FRACTIONS))],
                        help="label fractions of the train pool (default: %(default)s)")
    parser.add_argument("--seeds", nargs="+", default=[",".join(map(str, DEFAULT_SEEDS))],
                        help="seeds: labelled subsets and random inits (default: %(default)s)")
    parser.add_argument("--inits", nargs="+", default=None,
                        help="feature sources: pretrained, random-init, raw-pixels (images), tf-idf (text); "
                             "default: all that fit")
    parser.add_argument("--probes", nargs="+", default=[",".join(PROBES)], help="linear and/or knn")
    parser.add_argument("--pooling", choices=TEXT_POOLINGS, default="mean",
                        help="text features: token mean of the last layer, first token, or token mean of all layers' "
                             "average (default: mean)")
    parser.add_argument("--max-length", type=int, default=128, help="text: tokens per passage (default: 128)")
    parser.add_argument("--out", default=None, help="output folder (default: <run>/downstream)")
    parser.add_argument("--no-record", action="store_true", help="do not append to the run's metrics.jsonl/TensorBoard")
    args = parser.parse_args(argv)
    try:
        result = probe_model(
            args.path, task=args.task, fractions=split_values(args.fractions, float),
            seeds=split_values(args.seeds, int),
            inits=split_values(args.inits) if args.inits else None,
            probes=split_values(args.probes), pooling=args.pooling,
            max_length=args.max_length, out_dir=args.out, record=not args.no_record,
            log=lambda m: print(m, file=sys.stderr))
    except UserError as err:
        print(f"ssltrain-probe: error: {err}", file=sys.stderr)
        return 2
    print(result["md"].read_text())
    print(f"wrote {result['csv']}, {result['png']}, {result['md']} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
