"""No code from a model or tokenizer folder runs and no weights are unpickled.

A folder given as model.pretrained or tokenizer.path, or to ssltrain-probe / ssltrain-bleu, may
come from anywhere. transformers imports a folder's own .py files when its config.json or
tokenizer_config.json has an `auto_map` and the answer to "Do you wish to run the custom code?"
is y, and unpickles pytorch_model.bin when there is no model.safetensors. ssltrain refuses both
with one line, whatever stdin says. The folders here are real: a tiny BERT saved with
save_pretrained and a WordPiece tokenizer, then given an `auto_map` and a module that writes a
marker file when it is imported.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY
from test_cli_errors import assert_one_line_error_and_nothing_written

EVIL_MODULE = """\
from pathlib import Path

Path({marker!r}).write_text("imported")  # the side effect ssltrain must never cause

from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast


class EvilConfig(BertConfig):
    model_type = "evilbert"


class EvilModel(BertForMaskedLM):
    config_class = EvilConfig


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A tiny BertForMaskedLM (model.safetensors) with the 1000-token WordPiece tokenizer it was built for."""
    from pydoc_data.topics import topics

    from transformers import BertConfig, BertForMaskedLM

    from ssltrain.data.tokenizer import save_tokenizer, train_tokenizer
    from ssltrain.models import padded_vocab_size

    folder = tmp_path_factory.mktemp("model") / "bert"
    tokenizer = train_tokenizer(list(topics.values()), "wordpiece", 1000)
    config = BertConfig(vocab_size=padded_vocab_size(len(tokenizer)), hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                        pad_token_id=tokenizer.pad_token_id)
    BertForMaskedLM(config).save_pretrained(str(folder))
    save_tokenizer(tokenizer, str(folder))
    assert (folder / "model.safetensors").is_file()
    return folder


@pytest.fixture
def modules_cache(tmp_path_factory) -> Path:
    """Where transformers would copy and import a folder's code (kept out of ~/.cache and tmp_path)."""
    return tmp_path_factory.mktemp("hf-modules")


def with_own_code(src: Path, dst: Path, marker: Path, file: str, auto_map: dict, model_type: str | None = None):
    """A copy of `src` whose `file` (config.json or tokenizer_config.json) has `auto_map` pointing at
    evil.py, a module that writes `marker` when imported. For tokenizer_config.json, a tokenizer-only
    folder (no config.json to name a tokenizer class transformers ships)."""
    shutil.copytree(src, dst)
    if file == "tokenizer_config.json":
        for name in ("config.json", "model.safetensors"):
            (dst / name).unlink()
    path = dst / file
    config = json.loads(path.read_text())
    config["auto_map"] = auto_map
    if model_type is not None:
        config["model_type"] = model_type
    if file == "tokenizer_config.json":
        config["tokenizer_class"] = "EvilTokenizer"  # a class transformers does not ship: it must ask
    path.write_text(json.dumps(config, indent=2))
    (dst / "evil.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    return dst


def pickled_only(src: Path, dst: Path) -> Path:
    """A copy of `src` whose weights are pytorch_model.bin (a pickle) instead of model.safetensors."""
    import torch
    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    torch.save(load_file(str(dst / "model.safetensors")), dst / "pytorch_model.bin")
    (dst / "model.safetensors").unlink()
    return dst


def run(args: list[str], tmp_path: Path, modules_cache: Path, cache_dir: Path) -> subprocess.CompletedProcess:
    """`python <args>` in tmp_path with "y" answered to any question on stdin."""
    env = {**os.environ, "SSLTRAIN_CACHE": str(cache_dir), "HF_MODULES_CACHE": str(modules_cache)}
    return subprocess.run([sys.executable, *args], cwd=str(tmp_path), input="y\ny\ny\n", capture_output=True,
                          text=True, timeout=600, env=env)


MODEL_AUTO_MAP = {"AutoConfig": "evil.EvilConfig", "AutoModelForMaskedLM": "evil.EvilModel"}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}

FOLDERS = {
    # A model type transformers does not know: transformers asks, and "y" imports evil.py.
    "model-custom-type": ("model.pretrained", "config.json", MODEL_AUTO_MAP, "evilbert"),
    # A known model type with an auto_map: refused too, not left to transformers' choice of class.
    "model-known-type": ("model.pretrained", "config.json", MODEL_AUTO_MAP, None),
    # A tokenizer folder whose tokenizer class lives in the folder.
    "tokenizer": ("tokenizer.path", "tokenizer_config.json", TOKENIZER_AUTO_MAP, None),
}


@pytest.mark.parametrize("name", list(FOLDERS))
def test_a_folder_with_an_auto_map_is_refused_and_nothing_is_imported(name, model_folder, modules_cache, cache_dir,
                                                                     tmp_path):
    """Catches a from_pretrained without trust_remote_code=False (transformers prompts, and stdin "y"
    imports the folder's module) and the folder check being dropped: one line naming the folder, the
    file and the auto_map entry, exit 2, no run directory, no marker."""
    key, file, auto_map, model_type = FOLDERS[name]
    marker = tmp_path.parent / f"{tmp_path.name}-imported"
    folder = with_own_code(model_folder, tmp_path / "evil", marker, file, auto_map, model_type)
    before = set(tmp_path.iterdir())
    proc = run(["-m", "ssltrain", *TINY, "trainer.max_steps=1", "trainer.eval_batches=1", f"{key}={folder}",
                f"hydra.run.dir={tmp_path}/run"], tmp_path, modules_cache, cache_dir)
    assert not marker.exists(), "the folder's code was imported:\n" + proc.stderr[-3000:]
    entry = next(iter(auto_map))
    assert_one_line_error_and_nothing_written(proc, [f"{key}={str(folder)!r}", file, "auto_map", entry, "evil."],
                                              tmp_path, before)
    assert not list(modules_cache.rglob("evil*")), "the folder's code was copied to be imported"


def test_pickled_weights_are_refused_with_how_to_convert(model_folder, modules_cache, cache_dir, tmp_path):
    """Catches loading pytorch_model.bin (a pickle: unpickling can run code, and transformers shows a
    long traceback when torch refuses one): one line naming the folder and the file, saying safetensors
    are required and how to convert; nothing trained, no run directory."""
    folder = pickled_only(model_folder, tmp_path / "pickled")
    before = set(tmp_path.iterdir())
    proc = run(["-m", "ssltrain", *TINY, "trainer.max_steps=1", "trainer.eval_batches=1",
                f"model.pretrained={folder}", f"hydra.run.dir={tmp_path}/run"], tmp_path, modules_cache, cache_dir)
    assert_one_line_error_and_nothing_written(
        proc, [f"model.pretrained={str(folder)!r}", "pytorch_model.bin", "safetensors", "save_pretrained",
               "safe_serialization=True"], tmp_path, before)


def bleu_run_dir(compose, root: Path, final: Path) -> Path:
    """A span_corruption run directory (its config.yaml) whose final/ is `final`."""
    from omegaconf import OmegaConf

    root.mkdir()
    OmegaConf.save(compose(["objective=span_corruption", "model=t5-tiny"]), root / "config.yaml")
    shutil.move(str(final), root / "final")
    return root


TOOLS = {"probe": "ssltrain.evaluation.probe", "bleu": "ssltrain.evaluation.generation"}


@pytest.mark.parametrize("kind", ["auto_map", "pickled"])
@pytest.mark.parametrize("tool", list(TOOLS))
def test_probe_and_bleu_refuse_a_folder_with_code_or_pickled_weights(tool, kind, model_folder, modules_cache,
                                                                     cache_dir, compose, tmp_path):
    """ssltrain-probe and ssltrain-bleu load a run's final/ (or any model folder) through the same
    checked loaders: catches either tool calling from_pretrained directly (the prompt, then the
    import; or the pickle loaded). One line `<tool>: error: ...` naming the folder, exit 2."""
    marker = tmp_path.parent / f"{tmp_path.name}-imported"
    if kind == "auto_map":
        folder = with_own_code(model_folder, tmp_path / "evil", marker, "config.json", MODEL_AUTO_MAP, "evilbert")
        expect = ["auto_map", "evil.EvilConfig"]
    else:
        folder = pickled_only(model_folder, tmp_path / "pickled")
        expect = ["pytorch_model.bin", "safetensors"]
    if tool == "bleu":
        folder = bleu_run_dir(compose, tmp_path / "run", folder) / "final"
    proc = run(["-m", TOOLS[tool], str(folder), "--no-record"], tmp_path, modules_cache, cache_dir)
    assert not marker.exists(), "the folder's code was imported:\n" + proc.stderr[-3000:]
    output = f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 2, output
    assert "Traceback" not in proc.stderr + proc.stdout, output
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith(f"ssltrain-{tool}: error: ") and str(folder) in last, output
    for needle in expect:
        assert needle in last, f"{needle!r} not in {last!r}"


def test_every_from_pretrained_in_ssltrain_goes_through_the_checked_loaders():
    """Catches a new from_pretrained call that bypasses ssltrain/hub.py (and so the auto_map and
    pickle checks), and a loader in hub.py that stops passing trust_remote_code=False."""
    outside, unguarded = [], []
    for path in sorted((REPO / "ssltrain").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "from_pretrained"):
                continue
            if rel != "ssltrain/hub.py":
                outside.append(f"{rel}:{node.lineno}")
            elif not any(k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value is False
                         for k in node.keywords):
                unguarded.append(f"{rel}:{node.lineno}")
        assert "trust_remote_code=True" not in path.read_text(), rel
    assert not outside, f"from_pretrained outside ssltrain/hub.py (use its load_config/load_tokenizer/" \
                        f"load_model): {outside}"
    assert not unguarded, f"from_pretrained without trust_remote_code=False: {unguarded}"
