"""Data sources other than the embedded corpus, a local HF checkpoint as the starting point,
and Hydra sweeps, all through the real code paths."""

from __future__ import annotations

import json

import pytest
from conftest import TINY, read_metrics

from ssltrain.train import train

pytestmark = pytest.mark.slow


def write_corpus(folder, n_docs=40):
    """Real text: interpreter help topics, one per JSON line."""
    from ssltrain.data.docs import pydoc_topic_documents

    folder.mkdir(parents=True, exist_ok=True)
    docs = pydoc_topic_documents()[:n_docs]
    path = folder / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": d["text"], "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def test_text_files_jsonl_with_a_custom_column_trains(compose, tmp_path):
    path = write_corpus(tmp_path / "data")
    cfg = compose([*TINY, "data=text_files", f"data.paths={path}", "data.text_column=body",
                   "trainer.max_steps=4", "trainer.export=false"])
    result = train(cfg, tmp_path / "run")
    start = next(r for r in read_metrics(result["run_dir"]) if r["kind"] == "start")
    assert start["train_examples"] > 16 and start["validation_examples"] >= 1


def test_hf_dataset_loads_a_local_dataset_directory(compose, tmp_path):
    """`datasets.load_dataset(name)` with a local folder: the same call a hub name goes through."""
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    from ssltrain.data.docs import pydoc_topic_documents

    for i, doc in enumerate(pydoc_topic_documents()[:30]):
        (folder / f"doc{i:02d}.txt").write_text(doc["text"])
    cfg = compose([*TINY, "data=hf_dataset", f"data.name={folder}", "trainer.max_steps=3", "trainer.export=false"])
    result = train(cfg, tmp_path / "run")
    assert result["step"] == 3


def test_starting_from_a_local_checkpoint_keeps_its_weights(compose, tmp_path):
    first = train(compose([*TINY, "trainer.max_steps=20"]), tmp_path / "first")
    cfg = compose([*TINY, f"model.pretrained={first['export']}", "trainer.max_steps=1", "optimizer.lr=1e-9"])
    second = train(cfg, tmp_path / "second")
    start_eval = next(r for r in read_metrics(second["run_dir"]) if r["kind"] == "eval")
    # Same weights, tokenizer and held-out batches: step-0 loss equals the first run's final loss.
    assert start_eval["loss"] == pytest.approx(first["eval"]["loss"], rel=1e-4)


def test_sweep_folder_names_are_cut_to_fit_a_filesystem():
    """hydra.sweep.subdir: '<num>_<overrides>' as Hydra writes it, unless that exceeds what a path
    component may hold (255 bytes): then cut, with a digest keeping distinct jobs distinct. (The
    multirun test below makes such names: TINY's overrides alone pass 255 bytes.)"""
    from ssltrain.cli import MAX_DIRNAME_BYTES, sweep_subdir

    assert sweep_subdir(3, "optimizer.lr=0.001") == "3_optimizer.lr=0.001" and sweep_subdir(0, "") == "0"
    long = ",".join(f"trainer.key_{i}=value_{i}" for i in range(20))
    a, b = sweep_subdir(0, long), sweep_subdir(0, long.replace("value_19", "other"))
    assert a.startswith("0_trainer.key_0=value_0,") and len(a.encode()) <= MAX_DIRNAME_BYTES < 255
    assert a != b and len(b.encode()) <= MAX_DIRNAME_BYTES
    assert len(sweep_subdir(1, "data.path=" + "é" * 200).encode()) <= MAX_DIRNAME_BYTES  # cut on a character
    # A path value would nest the job's folder in folders named after its first parts.
    assert sweep_subdir(2, "model.pretrained=runs/mlm/final,seed=1") == "2_model.pretrained=runs_mlm_final,seed=1"


def test_multirun_sweep_runs_every_job(run_cli, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", *TINY, "trainer.max_steps=2", "trainer.export=false", "optimizer.lr=1e-3,2e-3",
                   f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "metrics.jsonl").is_file())
    assert len(jobs) == 2
    from omegaconf import OmegaConf

    assert sorted(OmegaConf.load(j / "config.yaml").optimizer.lr for j in jobs) == [1e-3, 2e-3]
