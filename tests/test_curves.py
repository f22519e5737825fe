"""Sample efficiency of fine-tuning (ssltrain/evaluation/curves.py through ssltrain-compare): the
gathering, line labels and mean +- std against hand-written run records, the routing of a mixed
directory (fine-tuning runs -> sample_efficiency.*, pretraining runs -> comparison.md), and end to
end: a real `ssltrain -m` fine-tuning sweep on the digits (a tiny SimCLR export vs random init,
2 label fractions x 2 seeds) gathered by `ssltrain-compare DIR`."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import read_metrics
from omegaconf import OmegaConf
from test_images import IMAGE_TINY, one_thread

from ssltrain.evaluation.curves import init_names, read_csv


def fake_run(run_dir, cfg, n_labelled: int, accuracy: float, macro_f1: float, finished: bool = True) -> None:
    """A run directory as train() leaves it (config.yaml + metrics.jsonl), with chosen final metrics."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    records = [{"kind": "start", "step": 0, "time": 0.0, "train_examples": n_labelled},
               {"kind": "eval", "step": 0, "time": 1.0, "loss": 2.3, "accuracy": 0.1, "macro_f1": 0.05}]
    if finished:
        records += [{"kind": "eval", "step": 40, "time": 2.0, "loss": 1.0, "accuracy": accuracy, "macro_f1": macro_f1},
                    {"kind": "end", "step": 40, "time": 3.0, "tokens_seen": 640}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_pretrained_inits_are_named_by_their_run():
    assert init_names(["/a/x/final", "/b/x/final", "/c/y", "runs/z/final"]) == {
        "/a/x/final": "a/x", "/b/x/final": "b/x", "/c/y": "y", "runs/z/final": "z"}


def test_gathering_labels_lines_by_what_differs_and_averages_over_seeds(compose, tmp_path):
    from ssltrain.evaluation.compare import compare_runs

    sweep = tmp_path / "sweep"
    pretrained = str(tmp_path / "pre" / "final")
    # (init, freeze, fraction, seed, labelled examples, accuracy, macro-F1)
    runs = [(pretrained, "none", 0.1, 0, 16, 0.80, 0.70), (pretrained, "none", 0.1, 1, 16, 0.90, 0.80),
            (pretrained, "none", 1.0, 0, 160, 0.95, 0.90),
            (None, "none", 0.1, 0, 16, 0.50, 0.40), (None, "none", 0.1, 1, 16, 0.70, 0.60),
            (None, "none", 1.0, 0, 160, 0.93, 0.90), (None, "backbone", 0.1, 0, 16, 0.30, 0.20)]
    for i, (init, freeze, fraction, seed, n, acc, f1) in enumerate(runs):
        cfg = compose(["+experiment=finetune_digits", f"model.pretrained={init or 'null'}",
                       f"objective.freeze={freeze}", f"data.label_fraction={fraction}", f"seed={seed}"])
        fake_run(sweep / f"{i}_ft", cfg, n, acc, f1)
    fake_run(sweep / "7_crashed", compose(["+experiment=finetune_digits"]), 16, 0.0, 0.0, finished=False)
    fake_run(sweep / "pretraining" / "simclr", compose(["objective=simclr"]), 1617, 0.5, 0.5)

    result = compare_runs([sweep], probe=False, bleu=False, log=lambda m: None)

    assert [run["name"] for run in result["runs"]] == ["simclr"], "pretraining runs keep today's comparison"
    assert "| simclr | simclr | resnet-tiny |" in (sweep / "comparison.md").read_text()
    curves = result["sample_efficiency"]
    assert [p.name for p in curves["skipped"]] == ["7_crashed"]
    rows = read_csv(curves["csv"])
    assert len(rows) == 7 and {r["run"] for r in rows} == {f"{i}_ft" for i in range(7)}
    assert {r["label"] for r in rows} == {"pre (freeze=none)", "random-init (freeze=none)",
                                          "random-init (freeze=backbone)"}
    assert all(r["init"] == ("pre" if r["pretrained"] else "random-init") for r in rows)
    md = curves["md"].read_text()
    assert "| init | 0.1 (16) | 1 (160) |" in md
    # Population std over seeds, as ssltrain-probe; [1]: fewer runs in the cell than the line's most.
    assert "| pre (freeze=none) | 0.850 +- 0.050 (0.750) | 0.950 +- 0.000 (0.900) [1] |" in md
    assert "| random-init (freeze=none) | 0.600 +- 0.100 (0.500) | 0.930 +- 0.000 (0.900) [1] |" in md
    assert "| random-init (freeze=backbone) | 0.300 +- 0.000 (0.200) | - |" in md
    assert "| *gain: pre (freeze=none) vs random-init (freeze=none)* | +0.250 | +0.020 |" in md
    assert "7_crashed" in md
    assert curves["png"].read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_compare_turns_a_real_finetune_sweep_into_sample_efficiency_curves(compose, run_cli, tmp_path, capsys):
    """`ssltrain -m ... model.pretrained=<export>,null` then `ssltrain-compare DIR`. The "pretrained"
    init is a 10-step SimCLR run: real, but far too short to be better than random init, so only the
    bookkeeping is checked here, not which line wins."""
    from ssltrain.data.corpus import load_corpus
    from ssltrain.data.labelled import stratified_subset
    from ssltrain.evaluation.compare import main
    from ssltrain.train import train

    sweep, fractions, max_images = tmp_path / "ft", (0.1, 1.0), 400
    with one_thread():
        simclr = compose(["objective=simclr", *IMAGE_TINY, "trainer.max_steps=10"])
        export = train(simclr, tmp_path / "simclr")["export"]
    out = run_cli("-m", "+experiment=finetune_digits", f"data.max_images={max_images}",
                  f"data.label_fraction={','.join(map(str, fractions))}", "seed=0,1", f"model.pretrained={export},null",
                  "trainer.max_steps=8", "trainer.batch_size=16", "trainer.micro_batch_size=16",
                  "trainer.log_every=4", f"hydra.sweep.dir={sweep}", env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]

    with one_thread():
        assert main([str(sweep)]) == 0
    printed = capsys.readouterr().out
    assert "# Sample efficiency: 8 fine-tuning runs" in printed and not (sweep / "comparison.md").exists()

    rows = read_csv(sweep / "sample_efficiency.csv")
    assert len(rows) == 8
    assert sorted((r["init"], r["fraction"], r["seed"]) for r in rows) == sorted(
        (init, f, s) for init in ("simclr", "random-init") for f in fractions for s in (0, 1))
    digits = compose(["data=digits", f"data.max_images={max_images}"])
    train_labels = load_corpus(digits.data, digits.cache_dir)[0]["train"]["label"]
    for r in rows:
        assert r["n_labelled"] == len(stratified_subset(train_labels, r["fraction"], r["seed"])), r
        assert r["task"] == "digits" and r["model"] == "resnet-tiny" and r["freeze"] == "none" and r["steps"] == 8
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["macro_f1"] <= 1.0
        final = [m for m in read_metrics(sweep / r["run"]) if m["kind"] == "eval"][-1]
        assert r["accuracy"] == pytest.approx(final["accuracy"], abs=1e-6), "the run's final held-out accuracy"
    assert {r["n_labelled"] for r in rows if r["fraction"] == 1.0} == {len(train_labels)}
    assert {r["label"] for r in rows} == {"simclr", "random-init"}, "nothing but the init differs"

    md = (sweep / "sample_efficiency.md").read_text()
    n_small = round(fractions[0] * len(train_labels))
    assert f"| init | 0.1 ({n_small}) | 1 ({len(train_labels)}) |" in md
    for init in ("simclr", "random-init"):
        (line,) = [ln for ln in md.splitlines() if ln.startswith(f"| {init} |")]
        cells = line.strip("| ").split(" | ")[1:]
        assert len(cells) == 2 and all(re.fullmatch(r"\d\.\d{3} \+- \d\.\d{3} \(\d\.\d{3}\)", c) for c in cells), line
        accs = [r["accuracy"] for r in rows if r["init"] == init and r["fraction"] == 0.1]
        assert cells[0].startswith(f"{np.mean(accs):.3f} +- {np.std(accs):.3f}"), (cells, accs)
    assert "| *gain: simclr vs random-init* |" in md
    png = (sweep / "sample_efficiency.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
