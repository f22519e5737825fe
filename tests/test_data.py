"""Corpus, tokenizer, packing and the resumable loader."""

from __future__ import annotations

import os

import numpy as np
import torch

from ssltrain.data.blocks import pack_ids
from ssltrain.data.corpus import in_validation_split, pydoc_topic_documents, stdlib_docstring_documents
from ssltrain.data.loader import BatchDataset, DataPosition, make_loader, train_batches


def test_embedded_corpus_is_real_english_from_the_interpreter():
    topics = pydoc_topic_documents()
    modules = stdlib_docstring_documents()
    assert len(topics) > 50 and len(modules) > 200
    text = " ".join(d["text"] for d in topics + modules)
    assert len(text) > 1_500_000
    words = text.lower().split()
    for common in ("the", "of", "and", "is", "return"):
        assert words.count(common) > 1000, common
    assert any(d["title"] == "module:json" for d in modules)


def test_validation_split_is_by_document_and_stable():
    titles = [f"module:m{i}" for i in range(2000)]
    held = [t for t in titles if in_validation_split(t, 0.05)]
    assert 60 < len(held) < 140
    assert held == [t for t in titles if in_validation_split(t, 0.05)]


def test_packing_keeps_every_token_once_in_order():
    docs = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
    blocks = pack_ids(docs, seq_len=4, sep_id=3, prefix=[2])
    assert all(len(b) == 4 and b[0] == 2 for b in blocks)
    stream = [t for d in docs for t in (*d, 3)]
    body = [t for b in blocks for t in b[1:]]
    assert body == stream[: len(body)] and len(stream) - len(body) < 3


def test_packed_corpus_blocks_decode_to_corpus_text(compose, cache_dir):
    from omegaconf import OmegaConf

    from ssltrain.data.blocks import build_blocks
    from ssltrain.data.corpus import load_corpus
    from ssltrain.data.tokenizer import build_tokenizer

    cfg = compose(["tokenizer.vocab_size=2000", "data.max_docs=150"])
    OmegaConf.update(cfg, "cache_dir", str(cache_dir))
    corpus, key = load_corpus(cfg.data, cfg.cache_dir)
    tokenizer = build_tokenizer(cfg, corpus, key)
    blocks = build_blocks(corpus, tokenizer, 64, cfg.cache_dir, key)
    first = blocks["train"][0]["input_ids"]
    assert len(first) == 64 and first[0] == tokenizer.cls_token_id
    # WordPiece decoding spaces out punctuation; compare with all whitespace removed.
    decoded = "".join(tokenizer.decode(first[1:20]).split())
    assert decoded in "".join(corpus["train"][0]["text"].split())
    # Cached: a second call returns the same blocks without re-tokenising.
    again = build_blocks(corpus, tokenizer, 64, cfg.cache_dir, key)
    assert again["train"][0]["input_ids"] == first


class Echo:
    """Collator returning the indices it got plus one draw of its generator."""

    def __call__(self, columns, generator):
        return {"x": torch.as_tensor(np.asarray(columns["x"])), "r": torch.rand(1, generator=generator)}


def examples(n=40):
    import datasets

    return datasets.Dataset.from_dict({"x": list(range(n))}).with_format("numpy")


def test_ranks_see_disjoint_examples_and_batches_do_not_depend_on_workers():
    ds = examples()
    per_rank = [BatchDataset(ds, Echo(), 4, seed=1, epoch=0, rank=r, world_size=2) for r in range(2)]
    seen = [set(torch.cat([per_rank[r][b]["x"] for b in range(len(per_rank[r]))]).tolist()) for r in range(2)]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 40
    batches = range(len(per_rank[0]))
    inline = [b["r"].item() for b in make_loader(per_rank[0], batches, num_workers=0, pin_memory=False)]
    workers = [b["r"].item() for b in make_loader(per_rank[0], batches, num_workers=2, pin_memory=False)]
    assert inline == workers
    assert BatchDataset(ds, Echo(), 4, seed=1, epoch=1).order.tolist() != per_rank[0].order.tolist()


def test_resuming_at_a_data_position_continues_the_same_stream():
    ds = examples(20)

    def make(epoch):
        return BatchDataset(ds, Echo(), 4, seed=3, epoch=epoch)

    full_pos = DataPosition()
    stream = train_batches(make, full_pos, 0, False)
    full = [next(stream)["x"].tolist() for _ in range(12)]  # crosses two epoch boundaries
    resumed = train_batches(make, DataPosition(epoch=1, batch=2), 0, False)
    assert [next(resumed)["x"].tolist() for _ in range(5)] == full[7:]
    assert (full_pos.epoch, full_pos.batch) == (2, 2)


class EchoPid(Echo):
    """Echo plus the id of the process that collated the batch."""

    def __call__(self, columns, generator):
        return {**super().__call__(columns, generator), "pid": torch.tensor(os.getpid())}


def test_one_set_of_workers_serves_every_epoch_with_the_same_batches():
    """Worker processes start once per run, not once per epoch (a restart stalls the GPU), and the
    batches are still each epoch's own, in order, whatever the number of workers."""
    ds = examples(20)

    def make(epoch):
        return BatchDataset(ds, EchoPid(), 4, seed=3, epoch=epoch)

    expected = [make(e)[b]["x"].tolist() for e in range(3) for b in range(5)]
    stream = train_batches(make, DataPosition(), num_workers=2, pin_memory=False)
    got = [next(stream) for _ in range(15)]  # three epochs of five micro-batches
    assert [b["x"].tolist() for b in got] == expected
    pids = {int(b["pid"]) for b in got}
    assert len(pids) == 2 and os.getpid() not in pids, pids
    stream.close()


def test_trained_tokenizers_round_trip_through_save_pretrained(tmp_path):
    from transformers import AutoTokenizer

    from ssltrain.data.tokenizer import save_tokenizer, train_tokenizer

    texts = [d["text"] for d in pydoc_topic_documents()[:20]]
    for kind, special in (("wordpiece", "mask_token"), ("bpe", "eos_token")):
        tok = train_tokenizer(texts, kind, 500)
        save_tokenizer(tok, tmp_path / kind)
        loaded = AutoTokenizer.from_pretrained(tmp_path / kind)
        assert getattr(loaded, special) is not None
        sample = "The for statement iterates over a sequence."
        assert loaded(sample)["input_ids"] == tok(sample)["input_ids"]
        if kind == "bpe":
            assert loaded.decode(loaded(sample)["input_ids"]) == sample  # byte-level is lossless


def test_a_split_smaller_than_one_global_micro_batch_is_repeated_to_fill_it():
    examples = {"x": np.arange(5)}

    class Rows:  # the two things BatchDataset reads: len() and row selection
        def __len__(self):
            return 5

        def __getitem__(self, idx):
            return {"x": examples["x"][idx]}

    def ranks(epoch):
        return [BatchDataset(Rows(), lambda cols, g: cols, 4, seed=3, epoch=epoch, rank=r, world_size=2)
                for r in range(2)]

    for epoch in range(3):
        datasets = ranks(epoch)
        assert [len(d) for d in datasets] == [1, 1]
        slots = [int(v) for d in datasets for v in d[0]["x"]]
        assert len(slots) == 8 and set(slots) == set(range(5)), slots  # every example, 3 of them twice
    assert ranks(0)[0].indices(0) != ranks(1)[0].indices(0) or ranks(0)[1].indices(0) != ranks(1)[1].indices(0)
    big = BatchDataset(Rows(), lambda cols, g: cols, 2, seed=3, epoch=0)  # enough examples: one pass, as before
    assert len(big) == 2 and len(big.order) == 5


def test_without_drop_last_every_example_is_seen_once_and_ranks_run_as_many_batches():
    """Held-out evaluation: 11 examples, micro-batch 3, 2 ranks -> one full global batch (6), then
    5 left: rank 0 gets 3, rank 1 gets 2. With 7 examples rank 1's second slot is empty: a filler."""
    for n, expected in ((11, [[3, 3], [3, 2]]), (7, [[3, 3], [1, 0]])):
        ds = examples(n)
        ranks = [BatchDataset(ds, Echo(), 3, seed=1, epoch=0, rank=r, world_size=2, shuffle=False, drop_last=False)
                 for r in range(2)]
        assert [len(d) for d in ranks] == [2, 2]
        assert [[len(d.indices(b)) for d in ranks] for b in range(2)] == expected
        seen = [int(v) for d in ranks for b in range(len(d)) if not d.is_filler(b) for v in d[b]["x"]]
        assert sorted(seen) == list(range(n))
        fillers = [(r, b) for r, d in enumerate(ranks) for b in range(len(d)) if d.is_filler(b)]
        assert fillers == ([] if n == 11 else [(1, 1)])
        for r, b in fillers:
            assert len(ranks[r][b]["x"]) == 1  # something to run, discarded by the caller
        assert len(BatchDataset(ds, Echo(), 3, seed=1, epoch=0, world_size=2, shuffle=False)) == 1  # drop_last


def test_held_out_evaluation_covers_the_whole_split_unless_metrics_depend_on_the_batch():
    """evaluate(max_batches=None) over 10 examples in micro-batches of 4: the mean of a per-example
    metric is over all 10 (the last batch has 2); an in-batch contrastive objective keeps 8."""
    from accelerate import Accelerator

    from ssltrain.evaluation.heldout import evaluate
    from ssltrain.objectives.base import Objective, ObjectiveOutput

    class Ids(Objective):
        def forward(self, batch):
            x = batch["x"].float()
            return ObjectiveOutput(metrics={"loss": (x.sum(), torch.tensor(float(len(x))))})

    class InBatch(Ids):
        metrics_per_example = False

    accelerator = Accelerator(cpu=True)
    ds = examples(10)
    for objective, mean in ((Ids(), 4.5), (InBatch(), 3.5)):  # mean of 0..9, of 0..7
        values = evaluate(objective, ds, Echo(), micro_batch_size=4, max_batches=None, seed=0,
                          accelerator=accelerator)
        assert values["loss"] == mean
