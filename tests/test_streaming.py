"""data.streaming=true: documents read with datasets streaming from local files written here,
sharded per rank, packed on the fly, held-out documents kept out, and exact resume."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, config_error, read_metrics
from omegaconf import OmegaConf

from ssltrain.data.blocks import pack_ids
from ssltrain.data.loader import DataPosition
from ssltrain.data.streaming import BlockPacker, RankStream, StreamSource, document_digest

# TINY without its data.max_docs (the corpora here are sized by the files written).
STREAM_TINY = [o for o in TINY if not o.startswith("data.max_docs")]


def paragraphs() -> list[str]:
    """Real English, unique, one line each: the paragraphs of the interpreter's help topics."""
    from pydoc_data.topics import topics

    seen, out = set(), []
    for name in sorted(topics):
        for para in topics[name].split("\n\n"):
            text = " ".join(para.split())
            if len(text) > 80 and text not in seen:
                seen.add(text)
                out.append(text)
    return out


def write_corpus(folder: Path, docs: list[str], n_files: int) -> list[list[str]]:
    """docs dealt round-robin into part0.txt ... (one document per line); returns each file's lines."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = [docs[i::n_files] for i in range(n_files)]
    for i, lines in enumerate(parts):
        (folder / f"part{i}.txt").write_text("\n".join(lines) + "\n")
    return parts


def streaming(folder: Path, *extra: str) -> list[str]:
    return [*STREAM_TINY, "data=text_files", f"data.paths={folder}", "data.streaming=true",
            "data.validation_docs=40", "data.shuffle_buffer=48", "data.tokenizer_docs=2000", *extra]


class FakeAccelerator:
    """What prepare_streaming asks of an Accelerator, for one given rank."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.process_index, self.num_processes = rank, world

    def main_process_first(self):
        import contextlib

        return contextlib.nullcontext()


def prepare(cfg, rank=0, world=1):
    from ssltrain.data.streaming import prepare_streaming

    return prepare_streaming(cfg, FakeAccelerator(rank, world))


@pytest.mark.parametrize("n_files", [1, 3, 4])  # 1 and 3: every 2nd document per rank; 4: whole files per rank
def test_ranks_get_disjoint_documents_whose_union_is_every_training_document(compose, tmp_path, n_files):
    docs = paragraphs()[:300]
    parts = write_corpus(tmp_path / "corpus", docs, n_files)
    cfg = compose(streaming(tmp_path / "corpus"))
    in_file_order = [line for part in parts for line in part]
    heldout, training = in_file_order[:40], in_file_order[40:]  # the leading data.validation_docs documents

    source = StreamSource(cfg.data)
    skip = frozenset(document_digest(t) for t in heldout)
    for epoch in (0, 1):
        per_rank = [list(RankStream(source, None, 64, heldout=skip, rank=r, world_size=2, seed=0,
                                    shuffle_buffer=8).documents(epoch)) for r in range(2)]
        assert all(per_rank), "every rank gets documents"
        assert not set(per_rank[0]) & set(per_rank[1])
        assert Counter(per_rank[0] + per_rank[1]) == Counter(training), "union = all training documents, once"


def test_packing_keeps_every_token_exactly_once_in_order():
    rng = np.random.default_rng(0)
    docs = [rng.integers(10, 99, size=int(n)).tolist() for n in rng.integers(1, 40, size=200)]
    packer = BlockPacker(16, sep_id=3, prefix=[2])
    blocks = [block for doc in docs for block in packer.add(doc)]
    stream = [tok for doc in docs for tok in (*doc, 3)]
    bodies = [tok for block in blocks for tok in block[1:]]
    assert all(len(b) == 16 and b[0] == 2 for b in blocks)
    assert bodies == stream[:len(bodies)] and len(stream) - len(bodies) == len(packer.carry) < 15
    assert packer.carry == stream[len(bodies):]
    assert blocks == pack_ids(docs, 16, 3, [2]), "the same blocks as the in-memory path"


def test_a_rank_stream_gives_the_packed_corpus_shuffled_in_windows(compose, tmp_path):
    """One rank, one epoch: the window-shuffled stream holds exactly the blocks that packing the
    training documents in order gives (the in-memory reference), in a different order."""
    parts = write_corpus(tmp_path / "corpus", paragraphs()[:400], 1)
    cfg = compose(streaming(tmp_path / "corpus", "data.shuffle_buffer=30"))
    tokenizer, examples = prepare(cfg)
    stream = examples["train"]
    training = parts[0][40:]
    ids = tokenizer(training, add_special_tokens=False)["input_ids"]
    reference = pack_ids(ids, 64, tokenizer.sep_token_id, [tokenizer.cls_token_id])
    windows = list(stream.windows(0))
    got = [tuple(b) for w in windows for b in w.blocks.tolist()]
    assert len(windows) > 3 and all(len(w.blocks) >= 30 for w in windows[:-1])
    assert sorted(got) == sorted(map(tuple, reference)) and got != [tuple(b) for b in reference]
    # Held out: the first 40 documents, packed in order, never in training.
    heldout_ids = tokenizer(parts[0][:40], add_special_tokens=False)["input_ids"]
    assert examples["validation"]["input_ids"] == pack_ids(heldout_ids, 64, tokenizer.sep_token_id,
                                                           [tokenizer.cls_token_id])


def test_held_out_documents_come_from_the_validation_split_when_the_dataset_has_one(compose, tmp_path):
    docs = paragraphs()[:240]
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.txt").write_text("\n".join(docs[:200]) + "\n")
    (tmp_path / "ds" / "validation.txt").write_text("\n".join(docs[200:]) + "\n")
    cfg = compose([*STREAM_TINY, "data=hf_dataset", f"data.name={tmp_path / 'ds'}", "data.streaming=true",
                   "data.validation_split=validation", "data.validation_docs=30", "data.tokenizer_docs=2000"])
    tokenizer, examples = prepare(cfg)
    assert examples["train"].heldout == frozenset()
    assert list(examples["train"].documents(0)) == docs[:200]
    val_ids = tokenizer(docs[200:230], add_special_tokens=False)["input_ids"]
    assert examples["validation"]["input_ids"] == pack_ids(val_ids, 64, tokenizer.sep_token_id,
                                                           [tokenizer.cls_token_id])


class Ids:
    """Collator returning the blocks and one draw of its generator."""

    def __call__(self, columns, generator):
        return {"input_ids": torch.as_tensor(columns["input_ids"]), "r": torch.rand(1, generator=generator)}


def test_a_stream_position_resumes_at_the_same_batch_anywhere(compose, tmp_path):
    """Batches resumed from any saved position (through JSON, as in a checkpoint) equal the
    uninterrupted stream's, across window and epoch boundaries."""
    write_corpus(tmp_path / "corpus", paragraphs()[:150], 2)
    cfg = compose(streaming(tmp_path / "corpus", "data.shuffle_buffer=20"))
    _, examples = prepare(cfg)
    data = examples["train"].train_data(Ids(), 8, seed=0)
    position = DataPosition()
    batches = data.batches(position, 0, False)
    full, saved = [], []
    for _ in range(40):
        full.append(next(batches))
        saved.append(json.loads(json.dumps(position.stream)))
    assert saved[-1]["epoch"] >= 1, "the run crosses an epoch boundary"
    assert len({s["window"] for s in saved if s["epoch"] == 0}) > 3
    for k in (0, 4, 11, len([s for s in saved if s["epoch"] == 0]) - 1, 33):
        workers = k % 2  # num_workers > 0: the next window is prepared in a background thread
        resumed = data.batches(DataPosition.from_state({"streams": [saved[k]]}, 0), workers, False)
        for expected in full[k + 1:k + 6]:
            got = next(resumed)
            assert torch.equal(got["input_ids"], expected["input_ids"]) and torch.equal(got["r"], expected["r"]), k
    prefetched = data.batches(DataPosition(), 2, False)
    assert all(torch.equal(next(prefetched)["input_ids"], b["input_ids"]) for b in full)
    first_epoch = [b["input_ids"] for b, s in zip(full, saved) if s["epoch"] == 0]
    second = [b["input_ids"] for b, s in zip(full, saved) if s["epoch"] == 1][:len(first_epoch)]
    assert not all(torch.equal(a, b) for a, b in zip(first_epoch, second)), "each epoch is reshuffled"


@pytest.mark.parametrize("overrides, needle", [
    (["+data.streaming=true"], "data.streaming=true reads data=text_files or data=hf_dataset; data=docs"),
    (["data=text_files", "data.paths=PATH", "data.streaming=true", "objective=nsp"],
     "cannot stream; data.streaming=true works with objective=ar, electra, mlm"),
    (["data=text_files", "data.paths=PATH", "data.streaming=true", "data.shuffle_buffer=0"],
     "data.shuffle_buffer=0 is invalid; expected an integer >= 1"),
    (["data=hf_dataset", "data.name=x", "data.streaming=yes"],
     "data.streaming='yes' is invalid; expected true or false"),
])
def test_streaming_mistakes_are_one_line_errors(compose, tmp_path, overrides, needle):
    (tmp_path / "a.txt").write_text("some text\n")
    overrides = [o.replace("PATH", str(tmp_path / "a.txt")) for o in overrides]
    assert needle in config_error(compose, overrides)


# ---------------------------------------------------------------- real runs

def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


@pytest.mark.slow
def test_streaming_mlm_run_learns(compose, tmp_path):
    from ssltrain.train import train

    write_corpus(tmp_path / "corpus", paragraphs()[:800], 4)
    cfg = compose(streaming(tmp_path / "corpus", "trainer.max_steps=40", "optimizer.lr=2e-3",
                            "trainer.export=false"))
    result = train(cfg, tmp_path / "run")
    records = read_metrics(result["run_dir"])
    start = next(r for r in records if r["kind"] == "start")
    assert start["train_examples"] is None and start["validation_examples"] > 4
    evals = [r for r in records if r["kind"] == "eval"]
    assert all(np.isfinite(r["loss"]) for r in records if r["kind"] in ("train", "eval"))
    assert evals[-1]["loss"] < evals[0]["loss"] - 1.0, "held-out MLM loss must fall clearly"


@pytest.mark.slow
def test_resumed_streaming_run_gives_the_uninterrupted_losses_and_weights(compose, tmp_path):
    """~170 blocks per epoch = ~10 batches of 16: the 24 steps cross two epoch boundaries and the
    checkpoint at step 7 sits inside a shuffle window."""
    from ssltrain.checkpoint import load_weights
    from ssltrain.train import train

    write_corpus(tmp_path / "corpus", paragraphs()[:190], 2)
    common = streaming(tmp_path / "corpus", "trainer.max_steps=24", "trainer.log_every=1",
                       "trainer.checkpoint_every=7", "trainer.keep_checkpoints=5", "trainer.export=false")
    full = train(compose(common), tmp_path / "full")
    part = tmp_path / "part"
    shutil.copytree(full["run_dir"], part)
    for ckpt in (part / "checkpoints").iterdir():
        if ckpt.name != "step-00000007":
            shutil.rmtree(ckpt)
    (part / "metrics.jsonl").unlink()
    state = json.loads((part / "checkpoints" / "step-00000007" / "trainer_state.json").read_text())
    assert state["streams"][0]["offset"] > 0, "resumes inside a window"
    train(compose(common), part)

    full_losses, resumed_losses = losses(full["run_dir"]), losses(part)
    assert sorted(resumed_losses) == list(range(8, 25))
    assert all(resumed_losses[s] == full_losses[s] for s in range(8, 25))
    end_state = json.loads((part / "checkpoints" / "step-00000024" / "trainer_state.json").read_text())
    assert end_state["streams"][0]["epoch"] >= 1
    w_full = load_weights(full["run_dir"] / "checkpoints" / "step-00000024" / "model.safetensors")
    w_res = load_weights(part / "checkpoints" / "step-00000024" / "model.safetensors")
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)


@pytest.mark.slow
def test_two_processes_stream_different_shards(compose, cache_dir, tmp_path):
    """torchrun, 2 CPU processes: each rank trains on its own shard (the first blocks it sees are
    the ones an in-process stream for that rank of 2 gives), and the replicas stay identical."""
    from test_multiprocess import child_env, free_port, launcher, run_group

    write_corpus(tmp_path / "corpus", paragraphs()[:400], 4)
    overrides = streaming(tmp_path / "corpus", "trainer.batch_size=32", "trainer.micro_batch_size=16",
                          "trainer.max_steps=6", "trainer.checkpoint_every=6", "trainer.export=false")
    run = tmp_path / "run"
    argv = [*launcher("torchrun", free_port()), "-m", "ssltrain", *overrides, f"hydra.run.dir={run}"]
    (tmp_path / "cwd").mkdir()
    proc = run_group(argv, tmp_path / "cwd", child_env(tmp_path, cache_dir))
    assert proc.returncode == 0, proc.stderr[-6000:]

    records = read_metrics(run)
    start = next(r for r in records if r["kind"] == "start")
    end = next(r for r in records if r["kind"] == "end")
    first = start["rank_first_examples"]
    assert start["world_size"] == 2 and len(first) == 2 and all(len(f) == 4 for f in first)
    assert not set(first[0]) & set(first[1]), f"ranks share blocks: {first}"
    cfg = OmegaConf.load(run / "config.yaml")  # the run's own config: the same (cached) tokenizer
    for rank in range(2):
        _, examples = prepare(cfg, rank, 2)
        expected = examples["train"].train_data(Ids(), 16, seed=0).first_examples(DataPosition(), 4)
        assert first[rank] == expected, rank
    checksums = end["param_checksums"]
    assert checksums[0] == checksums[1]
    state = json.loads((run / "checkpoints" / "step-00000006" / "trainer_state.json").read_text())
    assert [s["batch"] for s in state["streams"]] == [6, 6]
