"""Every user mistake gives one line `ssltrain: error: ...` naming the bad value (and a valid
choice where there is a set of them), exit code 2, no traceback, and no run directory.

Each case runs the real CLI in a subprocess (`python -m ssltrain ...`, cwd=tmp_path). Most stop
in the preflight (config composition + validation, before Hydra creates anything); the data
cases (empty / blank / non-UTF-8 files) get as far as reading the corpus inside the run and
must leave no run directory behind either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from conftest import TINY


@dataclass
class Case:
    args: list[str]  # "{tmp}" is replaced by the test's tmp_path
    expect: list[str]  # substrings of the error line: the bad value, a valid choice, ...
    files: dict[str, bytes] = field(default_factory=dict)  # input files created in tmp_path first
    env: dict[str, str] = field(default_factory=dict)


CASES = {
    # Unknown config group options: the message names the bad option and lists the valid ones.
    "unknown-model": Case(["model=bert-huge"], ["bert-huge", "bert-tiny", "gpt2-tiny"]),
    "unknown-objective": Case(["objective=nope"], ["nope", "mlm", "ar"]),
    # An objective module with a bug: the message carries the module's own exception, not only "cannot
    # be imported" (cwd is on sys.path under `python -m`).
    "objective-with-a-bug": Case(["objective._target_=buggy_objective.Buggy"],
                                 ["buggy_objective.Buggy", "NameError", "undefined_helper", "SSLTRAIN_DEBUG=1"],
                                 files={"buggy_objective.py": b"READY = undefined_helper()\n"}),
    # Values of the wrong type.
    "max-steps-not-int": Case(["trainer.max_steps=abc"], ["trainer.max_steps", "abc", "integer"]),
    "lr-not-number": Case(["optimizer.lr=fast"], ["optimizer.lr", "fast", "number"]),
    # A misspelt key: named, with the key that was probably meant.
    "unknown-key": Case(["trainer.max_stepz=5"], ["trainer.max_stepz", "trainer.max_steps"]),
    "unknown-model-key": Case(["model=gpt2-tiny", "model.config.n_embdd=64"],
                              ["model.config.n_embdd", "model.config.n_embd?", "n_head"]),
    # Data paths.
    "missing-data-path": Case(["data=text_files", "data.paths=/nonexistent.txt"], ["/nonexistent.txt"]),
    "no-data-paths": Case(["data=text_files"], ["data.paths"]),
    "hf-dataset-no-name": Case(["data=hf_dataset"], ["data.name"]),
    # Corpora that only reading reveals as unusable (these get past the preflight).
    "empty-file": Case(["data=text_files", "data.paths={tmp}/empty.txt", *TINY], ["{tmp}/empty.txt", "empty"],
                       files={"empty.txt": b""}),
    "blank-lines-file": Case(["data=text_files", "data.paths={tmp}/blank.txt", *TINY], ["{tmp}/blank.txt"],
                             files={"blank.txt": b"\n\n\n\n"}),
    "non-utf8-file": Case(["data=text_files", "data.paths={tmp}/latin1.txt", *TINY],
                          ["{tmp}/latin1.txt", "UTF-8"],
                          files={"latin1.txt": "Caf\u00e9.\nDeuxi\u00e8me ligne.\n".encode("latin-1")}),
    # Shapes and ranges.
    "seq-len-beyond-positions": Case(["trainer.seq_len=4096"], ["trainer.seq_len=4096", "512"]),
    "batch-not-divisible": Case(["trainer.batch_size=30", "trainer.micro_batch_size=16"],
                                ["trainer.batch_size=30", "16"]),
    "max-steps-zero": Case(["trainer.max_steps=0"], ["trainer.max_steps=0", ">= 1"]),
    "lr-out-of-range": Case(["optimizer.lr=5"], ["optimizer.lr=5", "(0.0, 1.0]"]),
    "mixed-precision-choice": Case(["hardware.mixed_precision=fp8"], ["fp8", "bf16"]),
    # Combinations.
    "objective-model-mismatch": Case(["objective=ar", "model=bert-base"], ["bert-base", "gpt2"]),
    "bad-sweep-value": Case(["-m", "model=bert-tiny,bert-huge"], ["bert-huge", "bert-tiny"]),
    "negative-micro-batch": Case(["trainer.micro_batch_size=-4"], ["trainer.micro_batch_size=-4", "auto", ">= 1"]),
    "batch-not-splitting-over-processes": Case(["trainer.batch_size=32"], ["trainer.batch_size=32", "3 processes"],
                                               env={"WORLD_SIZE": "3"}),
    # An unquoted ~ (the shell's quotes are gone): Hydra's grammar error, with how to quote.
    "unquoted-tilde": Case(["data=text_files", "data.paths=~/corpus/*.txt"], ["data.paths=~/corpus/*.txt",
                                                                             "key=\"'value'\"", "$HOME"]),
    "unknown-scheduler": Case(["optimizer.scheduler=warmup_magic"], ["warmup_magic", "cosine", "linear"]),
    "image-objective-on-text": Case(["objective=simclr", "data=docs"], ["docs", "digits"]),
    # Paths to resume from or start from.
    "resume-path-missing": Case(["trainer.resume={tmp}/nope"], ["trainer.resume", "{tmp}/nope", "auto"]),
    "resume-path-not-a-checkpoint": Case(["trainer.resume={tmp}/notckpt", *TINY],
                                         ["{tmp}/notckpt", "not a complete checkpoint", "manifest.json is missing"],
                                         files={"notckpt/readme.txt": b"not a checkpoint"}),
    "pretrained-missing": Case(["model.pretrained={tmp}/nomodel"], ["model.pretrained", "{tmp}/nomodel"]),
    # No GPU visible (forced, so the case holds on GPU machines too).
    "gpu-without-gpu": Case(["hardware=gpu"], ["hardware.device=cuda", "hardware=cpu"],
                            env={"CUDA_VISIBLE_DEVICES": ""}),
}


def _no_traceback(proc) -> None:
    assert "Traceback" not in proc.stdout and "Traceback" not in proc.stderr, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", list(CASES))
def test_user_error_is_one_line_and_leaves_nothing(name, run_cli, tmp_path):
    case = CASES[name]
    for file, content in case.files.items():
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / file).write_bytes(content)
    before = set(tmp_path.iterdir())
    args = [a.replace("{tmp}", str(tmp_path)) for a in case.args]

    proc = run_cli(*args, f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/multirun",
                   env=case.env)
    assert_one_line_error_and_nothing_written(proc, [e.replace("{tmp}", str(tmp_path)) for e in case.expect],
                                              tmp_path, before)


def assert_one_line_error_and_nothing_written(proc, expect: list[str], tmp_path, before: set) -> None:
    """Exit 2, no traceback, a last line `ssltrain: error: ...` holding every string of `expect`, and
    nothing new in tmp_path (the run was given hydra.run.dir=tmp_path/run)."""
    output = f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 2, output
    _no_traceback(proc)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, output
    last = lines[-1]
    assert last.startswith("ssltrain: error: "), output
    for expected in expect:
        assert expected in last, f"{expected!r} not in {last!r}"
    # Nothing that looks like a run: no run/sweep directory, no outputs/ in the working directory.
    assert not (tmp_path / "run").exists(), sorted(p.name for p in (tmp_path / "run").rglob("*"))
    assert not (tmp_path / "multirun").exists()
    assert set(tmp_path.iterdir()) == before, sorted(p.name for p in set(tmp_path.iterdir()) - before)


@pytest.fixture(scope="module")
def export_and_tokenizers(cache_dir, tmp_path_factory):
    """A real tiny run's final/ (a 2000-token WordPiece vocabulary, 2048 embedding rows after padding),
    the same model saved without its tokenizer, and two other WordPiece tokenizers (1000, 3000 tokens)."""
    import os
    import shutil
    import subprocess
    import sys
    from pydoc_data.topics import topics

    from ssltrain.data.tokenizer import save_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("export")
    proc = subprocess.run([sys.executable, "-m", "ssltrain", *TINY, "trainer.max_steps=1", "trainer.eval_batches=1",
                           f"hydra.run.dir={root / 'run'}"], cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SSLTRAIN_CACHE": str(cache_dir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths = {"final": root / "run" / "final", "model_only": root / "model-only"}
    paths["model_only"].mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(paths["final"] / name, paths["model_only"] / name)
    for size in (1000, 3000):
        paths[f"tok{size}"] = root / f"tok{size}"
        save_tokenizer(train_tokenizer(list(topics.values()), "wordpiece", size), str(paths[f"tok{size}"]))
    return paths


VOCAB_MISMATCHES = {
    # Another tokenizer next to a run's export, smaller or larger than the one it was trained with.
    "smaller-tokenizer-path": (["model.pretrained={final}", "tokenizer.path={tok1000}"], ["2000", "1000"]),
    "larger-tokenizer-path": (["model.pretrained={final}", "tokenizer.path={tok3000}"], ["2000", "3000"]),
    # The export without its tokenizer: one is trained with another tokenizer.vocab_size (2048 rows vs 1000).
    "other-vocab-size": (["model.pretrained={model_only}", "tokenizer.vocab_size=1000"], ["2048", "1000"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VOCAB_MISMATCHES))
def test_a_tokenizer_that_does_not_fit_the_loaded_model_is_a_one_line_error(name, export_and_tokenizers, run_cli,
                                                                           tmp_path):
    """model.pretrained + a tokenizer other than the model's own: its ids would index unrelated
    embedding rows (silently, when the tokenizer is the smaller). One line naming both sizes."""
    args, sizes = VOCAB_MISMATCHES[name]
    args = [a.format(**export_and_tokenizers) for a in args]
    before, export_files = set(tmp_path.iterdir()), sorted(export_and_tokenizers["final"].iterdir())
    proc = run_cli(*TINY, *args, f"hydra.run.dir={tmp_path}/run")
    pretrained = args[0].split("=", 1)[1]
    assert_one_line_error_and_nothing_written(
        proc, [f"model.pretrained={pretrained!r}", *(f" {size}" for size in sizes)], tmp_path, before)
    assert sorted(export_and_tokenizers["final"].iterdir()) == export_files


def test_help_lists_groups_and_options(run_cli, tmp_path):
    proc = run_cli("--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    _no_traceback(proc)
    for text in ("model:", "objective:", "data:", "hardware:",  # the config groups...
                 "bert-tiny", "bert-base", "gpt2-tiny", "mlm", "ar", "docs", "text_files", "hf_dataset",
                 "cpu", "gpu",
                 "trainer:", "max_steps"):  # ...and the keys
        assert text in proc.stdout, f"{text!r} missing from --help:\n{proc.stdout}"
    assert list(tmp_path.iterdir()) == []


def test_cfg_job_prints_config_without_a_run(run_cli, tmp_path):
    proc = run_cli("--cfg", "job", "objective=ar", "model=gpt2-tiny", "trainer.max_steps=7",
                   f"hydra.run.dir={tmp_path}/run", timeout=120)
    assert proc.returncode == 0, proc.stderr
    _no_traceback(proc)
    import yaml

    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["name"] == "gpt2-tiny"
    assert cfg["objective"]["_target_"].endswith("CausalLM")
    assert cfg["trainer"]["max_steps"] == 7
    assert "hydra" not in cfg
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", [["--cfg", "job"], ["--help"]])
def test_info_flags_with_a_bad_group_option_or_key_are_one_line_errors(run_cli, tmp_path, flag):
    """--cfg / --help print without running, but what they print must compose: a bad choice gets the
    same one line as for a run (Hydra alone printed its multi-line search-path report, exit 1)."""
    for bad, needle in (("model=bert-huge", "Could not find 'model/bert-huge', Available options in 'model': "
                                            "bert-base, bert-tiny"),
                        ("trainer.max_stepz=3", "trainer.max_stepz is not a config key; did you mean "
                                                "trainer.max_steps?")):
        proc = run_cli(*flag, bad, f"hydra.run.dir={tmp_path}/run", timeout=120)
        assert proc.returncode == 2 and proc.stdout == "", proc.stdout
        _no_traceback(proc)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_output_directory_that_cannot_be_created_is_a_one_line_error(run_cli, tmp_path):
    (tmp_path / "afile").write_text("a file, not a folder")
    proc = run_cli(f"hydra.run.dir={tmp_path}/afile/run", timeout=120)
    assert proc.returncode == 2, proc.stderr
    _no_traceback(proc)
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("ssltrain: error: hydra.run.dir=") and "is not a directory" in last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_ssltrain_debug_shows_the_traceback_of_a_user_error_with_its_cause(run_cli, tmp_path):
    """SSLTRAIN_DEBUG=1: the traceback (the objective module's own line among it) comes before the one
    error line. Catches a ConfigError raised `from None`, which would drop the cause."""
    (tmp_path / "buggy_objective.py").write_text("READY = undefined_helper()\n")
    proc = run_cli("objective._target_=buggy_objective.Buggy", f"hydra.run.dir={tmp_path}/run",
                   env={"SSLTRAIN_DEBUG": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" in proc.stderr and "buggy_objective.py" in proc.stderr and "undefined_helper" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("ssltrain: error: objective._target_=")
    assert not (tmp_path / "run").exists()
