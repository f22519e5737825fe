"""Streaming text corpora (data.streaming=true): corpora larger than the disk, read with
`datasets.load_dataset(..., streaming=True)` and tokenised and packed on the fly.

  documents   text_files (the "text" / "json" / "csv" / "parquet" builders over local files) or any
              hf_dataset name, as an IterableDataset; documents shorter than data.min_doc_chars dropped.
  held out    the dataset's validation split when it has one (hf_dataset with data.validation_split),
              else the first data.validation_docs documents of the train split; those are kept out of
              training by a digest of their text (so also any duplicate of them), which holds whatever
              the sharding and shard order. Evaluation packs them once, like the in-memory path.
  sharding    `datasets.distributed.split_dataset_by_node`: whole shards (files) per rank when their
              number divides by the world size, else every world-th document; ranks never share one.
              Shares may differ in size: each rank starts its next epoch when its own share ends (the
              loop counts steps, not epochs). data.max_docs is datasets' take(), divided among shards,
              and freezes the shard order.
  packing     the same blocks as ssltrain/data/blocks.py: [CLS] (when the tokenizer has one) + documents
              concatenated, each followed by the separator, no padding; the tail that does not fill a
              block carries over to the next documents.
  shuffling   per epoch the shard order (`set_epoch(seed + epoch)`), then blocks are shuffled in windows
              of data.shuffle_buffer blocks with a generator seeded by (seed, epoch, rank, window).

Exact resume: a window is a pure function of where its documents start (the IterableDataset's
`state_dict()`, plus the carried-over tokens), so a rank's place in its stream is (epoch, batch,
window start, blocks taken from the window): a few integers and under seq_len tokens. Resuming
re-reads at most one window. The collator's randomness is seeded by (seed, epoch, batch, rank) as in
ssltrain/data/loader.py, so a resumed run gives the uninterrupted run's batches.

Only objectives that train on the default packed blocks can stream (mlm, ar, electra); the
others build whole examples (sentence pairs, sentences, images) from random access to documents.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from ssltrain.data.blocks import separator_id
from ssltrain.data.cache import fingerprint, hub_load_errors
from ssltrain.data.corpus import _EXTENSION_FORMATS, _not_utf8_message, expand_paths
from ssltrain.data.loader import DataPosition, derived_seed
from ssltrain.data.tokenizer import build_tokenizer
from ssltrain.errors import ConfigError, DataError

STREAM_VERSION = 1  # bump when reading, held-out selection or packing below change (invalidates tokenizers)
STREAMING_SOURCES = ("text_files", "hf_dataset")
TOKENIZE_BATCH = 64  # documents per tokenizer call
_WINDOW_SEED_TAG = 104_729  # keeps window permutations apart from the collator's (seed, epoch, batch, rank) seeds


def is_streaming(data_cfg: DictConfig) -> bool:
    return bool(data_cfg.get("streaming"))


def check_streaming_source(data_cfg: DictConfig) -> None:
    """One-line error for data.streaming=true with a source that is loaded in memory."""
    if data_cfg.source not in STREAMING_SOURCES:
        raise ConfigError(f"data.streaming=true reads data={' or data='.join(STREAMING_SOURCES)}; "
                          f"data={data_cfg.source} is loaded in memory (drop data.streaming)")


# ---------------------------------------------------------------- documents

def document_digest(text: str) -> bytes:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).digest()


class StreamSource:
    """One split of a text_files / hf_dataset corpus as a datasets IterableDataset of documents."""

    def __init__(self, data_cfg: DictConfig):
        self.cfg = data_cfg
        self.files = None
        if data_cfg.source == "text_files":
            self.files = expand_paths(data_cfg.paths)

    @property
    def has_validation_split(self) -> bool:
        return self.cfg.source == "hf_dataset" and bool(self.cfg.validation_split)

    @property
    def origin(self) -> str:
        return f"data.paths={self.files[:3]}" if self.files is not None else f"data.name={self.cfg.name!r}"

    def key(self) -> str:
        """Names the documents without reading them (for the tokenizer cache)."""
        d = self.cfg
        if self.files is not None:
            identity = ["text_files", d.format, [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in self.files]]
        else:
            identity = ["hf_dataset", d.name, d.config_name, d.revision, d.train_split, d.validation_split]
        return fingerprint("stream", STREAM_VERSION, identity, d.text_column, d.min_doc_chars, d.max_docs,
                           d.validation_docs, d.tokenizer_docs)

    def open(self, split: str = "train"):
        """The split as a fresh IterableDataset (fresh: datasets keeps iteration state in objects that
        copies share). train: at most data.max_docs documents, which datasets divides among the shards."""
        ds = self._load(split)
        if split == "train" and self.cfg.max_docs:
            ds = ds.take(self.cfg.max_docs)
        return ds

    def _load(self, split: str):
        import datasets

        d = self.cfg
        try:
            if self.files is not None:
                return datasets.load_dataset(_file_format(d, self.files), data_files={"train": self.files},
                                             split="train", streaming=True)
            theirs = d.train_split if split == "train" else d.validation_split
            return datasets.load_dataset(d.name, d.config_name, split=theirs, revision=d.revision, streaming=True)
        except hub_load_errors() as err:  # network, missing dataset, bad split: all user-facing here
            text = str(err).strip()
            raise DataError(f"{self.origin} cannot be streamed: "
                            f"{text.splitlines()[0] if text else type(err).__name__}") from None

    def documents(self, ds, skip: frozenset[bytes] = frozenset()) -> Iterator[str]:
        """Texts of ds at least data.min_doc_chars long, minus those whose digest is in `skip`."""
        import datasets

        column, min_chars = self.cfg.text_column, max(self.cfg.min_doc_chars, 1)
        try:
            for example in ds:
                if column not in example:
                    raise DataError(f"{self.origin} has no column data.text_column={column!r}; "
                                    f"columns: {', '.join(example)}")
                text = example[column]
                if text is None or len(text) < min_chars or (skip and document_digest(text) in skip):
                    continue
                yield text
        except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as err:
            cause = err if isinstance(err, UnicodeDecodeError) else err.__cause__ or err
            if isinstance(cause, UnicodeDecodeError) and self.files is not None:
                raise DataError(_not_utf8_message(self.files, cause)) from None
            raise DataError(f"{self.origin}: cannot read: {str(cause).strip().splitlines()[0]}") from None


def _file_format(data_cfg: DictConfig, files: list[str]) -> str:
    formats = {data_cfg.format} if data_cfg.format != "auto" else {_EXTENSION_FORMATS[Path(f).suffix] for f in files}
    if len(formats) != 1:
        raise ConfigError(f"data.paths mixes formats {sorted(formats)}; give one kind of file or set data.format")
    return formats.pop()


# ---------------------------------------------------------------- packing

class BlockPacker:
    """Documents -> blocks of seq_len ids = prefix + body, as build_blocks packs them; the tokens
    that do not fill a block yet wait in `carry` for the next documents."""

    def __init__(self, seq_len: int, sep_id: int, prefix: list[int], carry=()):
        self.body_len = seq_len - len(prefix)
        self.sep_id, self.prefix = sep_id, list(prefix)
        self.carry = list(carry)

    def add(self, ids: list[int]) -> list[list[int]]:
        """Append one tokenised document (and a separator); return the blocks it completes."""
        self.carry.extend(ids)
        self.carry.append(self.sep_id)
        b = self.body_len
        n = len(self.carry) // b
        blocks = [self.prefix + self.carry[i * b:(i + 1) * b] for i in range(n)]
        del self.carry[:n * b]
        return blocks


def packer_for(tokenizer, seq_len: int, carry=()) -> BlockPacker:
    prefix = [tokenizer.cls_token_id] if getattr(tokenizer, "cls_token_id", None) is not None else []
    return BlockPacker(seq_len, separator_id(tokenizer), prefix, carry)


def tokenize(texts: list[str], tokenizer) -> list[list[int]]:
    """Ids without special tokens, as build_blocks tokenises; through the Rust tokenizer when there
    is one (no "longer than model_max_length" warning: documents are meant to be long)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def pack_texts(texts: list[str], tokenizer, packer: BlockPacker) -> list[list[int]]:
    """The blocks that adding these documents (tokenised in one call) completes."""
    return [block for ids in tokenize(texts, tokenizer) for block in packer.add(ids)]


# ---------------------------------------------------------------- one rank's stream

@dataclass
class Window:
    """data.shuffle_buffer blocks (a few more: the last documents read may complete several), shuffled."""

    index: int
    start: dict  # {"source": IterableDataset state where its documents begin (None: epoch start), "carry": ids}
    blocks: np.ndarray  # (n, seq_len) int32, in shuffled order
    end: dict  # the next window's start


class RankStream:
    """This rank's training blocks: its shard of the train split, minus the held-out documents,
    tokenised, packed and window-shuffled. Stands where build_examples' "train" Dataset stands."""

    def __init__(self, source: StreamSource, tokenizer, seq_len: int, *, heldout: frozenset[bytes], rank: int,
                 world_size: int, seed: int, shuffle_buffer: int):
        self.source, self.tokenizer, self.seq_len = source, tokenizer, seq_len
        self.heldout, self.rank, self.world_size = heldout, rank, world_size
        self.seed, self.shuffle_buffer = seed, shuffle_buffer

    def dataset(self, epoch: int):
        """This rank's share of the train split in epoch `epoch` (shard order reshuffled per epoch)."""
        from datasets.distributed import split_dataset_by_node

        ds = split_dataset_by_node(self.source.open("train"), rank=self.rank, world_size=self.world_size)
        ds.set_epoch(self.seed + epoch)
        return ds

    def documents(self, epoch: int) -> Iterator[str]:
        return self.source.documents(self.dataset(epoch), skip=self.heldout)

    def windows(self, epoch: int, index: int = 0, start: dict | None = None) -> Iterator[Window]:
        """Windows index, index + 1, ... of the epoch; `start` is where window `index` begins."""
        ds = self.dataset(epoch)
        start = start or {"source": None, "carry": []}
        if start["source"] is not None:
            ds.load_state_dict(start["source"])
        packer = packer_for(self.tokenizer, self.seq_len, start["carry"])
        texts = self.source.documents(ds, skip=self.heldout)
        while True:
            blocks: list[list[int]] = []
            exhausted = False
            while len(blocks) < self.shuffle_buffer:
                # About one block per document or more: read no more documents than blocks still wanted.
                batch = list(islice(texts, min(TOKENIZE_BATCH, self.shuffle_buffer - len(blocks))))
                if not batch:
                    exhausted = True
                    break
                blocks.extend(pack_texts(batch, self.tokenizer, packer))
            # The state after the last document read: ds yields nothing ahead of what was asked.
            end = {"source": ds.state_dict(), "carry": list(packer.carry)}
            if blocks:
                order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(
                    derived_seed(self.seed, epoch, self.rank, index, _WINDOW_SEED_TAG)))
                yield Window(index, start, np.asarray(blocks, dtype=np.int32)[order.numpy()], end)
            if exhausted:
                return
            index, start = index + 1, end

    def train_data(self, collator: Callable, micro_batch_size: int, *, seed: int) -> StreamingTrainData:
        return StreamingTrainData(self, collator, micro_batch_size, seed=seed)


def prefetched(items: Iterator, depth: int) -> Iterator:
    """`items`, computed up to `depth` ahead in a background thread (the Rust tokenizer releases the
    GIL, so reading and packing overlap the training step). Changes timing only: a window is a pure
    function of where it starts. Closing the generator stops the thread."""
    ready: queue.Queue = queue.Queue(depth)
    stop, end = threading.Event(), object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except Exception as err:  # re-raised in the consumer, e.g. a DataError on a bad file
            put(err)

    threading.Thread(target=work, name="ssltrain-stream", daemon=True).start()
    try:
        while (item := ready.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def epoch_start(epoch: int) -> dict:
    return {"epoch": epoch, "batch": 0, "window": 0, "start": None, "offset": 0}


class StreamingTrainData:
    """Micro-batches from a RankStream, with the same interface as loader.IndexedTrainData.
    DataPosition.stream holds {"epoch", "batch", "window", "start", "offset"}: the next block is
    block `offset` of window `window`, which begins at `start`."""

    num_examples = None  # unknown until the stream has been read to its end

    def __init__(self, stream: RankStream, collator: Callable, micro_batch_size: int, *, seed: int):
        self.stream, self.collator, self.micro_batch_size, self.seed = stream, collator, micro_batch_size, seed

    def blocks(self, state: dict, prefetch: int = 0) -> Iterator[tuple[np.ndarray, dict]]:
        """The epoch's blocks from `state` on, each with the place just after it; `prefetch` windows
        are prepared ahead in a background thread."""
        windows = self.stream.windows(state["epoch"], state["window"], state["start"])
        for window in prefetched(windows, prefetch) if prefetch else windows:
            first = state["offset"] if window.index == state["window"] else 0
            for i in range(first, len(window.blocks)):
                after = ({"window": window.index, "start": window.start, "offset": i + 1} if i + 1 < len(window.blocks)
                         else {"window": window.index + 1, "start": window.end, "offset": 0})
                yield window.blocks[i], after

    def first_examples(self, position: DataPosition, n: int) -> list[str]:
        """Short digests of the next n blocks this rank trains on (to show ranks see different data)."""
        taken = islice(self.blocks(position.stream or epoch_start(position.epoch)), n)
        return [hashlib.sha1(block.tobytes()).hexdigest()[:12] for block, _ in taken]

    def batches(self, position: DataPosition, num_workers: int, pin_memory: bool) -> Iterator[dict[str, torch.Tensor]]:
        """Endless micro-batches from `position` on, advancing it in place after each one. Read in
        this process; num_workers > 0 prepares the next window in a background thread;
        pin_memory pins the collated tensors."""
        pin = pin_memory and torch.cuda.is_available()
        state = position.stream or epoch_start(position.epoch)
        while True:
            epoch, batch = state["epoch"], state["batch"]
            pending: list[np.ndarray] = []
            for block, after in self.blocks(state, prefetch=1 if num_workers else 0):
                pending.append(block)
                if len(pending) < self.micro_batch_size:
                    continue
                generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch, batch, self.stream.rank))
                out = self.collator({"input_ids": np.stack(pending)}, generator)
                pending = []
                batch += 1
                position.epoch, position.batch = epoch, batch
                position.stream = {"epoch": epoch, "batch": batch, **after}
                yield {k: v.pin_memory() for k, v in out.items()} if pin else out
            if batch == 0:
                raise DataError(
                    f"rank {self.stream.rank} of {self.stream.world_size}: its share of the stream gives fewer than "
                    f"trainer.micro_batch_size={self.micro_batch_size} blocks of {self.stream.seq_len} tokens "
                    f"({self.stream.source.origin}); add data or lower trainer.micro_batch_size or trainer.seq_len")
            state = epoch_start(epoch + 1)
            position.epoch, position.batch, position.stream = epoch + 1, 0, state


# ---------------------------------------------------------------- the run's data

def prepare_streaming(cfg: DictConfig, accelerator):
    """(tokenizer, {"train": RankStream, "validation": Dataset of blocks}) for data.streaming=true.
    The main process trains (and caches) the tokenizer first; the others then read it."""
    import datasets

    data, seq_len = cfg.data, cfg.trainer.seq_len
    source = StreamSource(data)
    with accelerator.main_process_first():
        if source.has_validation_split:
            heldout_docs = list(islice(source.documents(source.open("validation")), data.validation_docs))
            heldout = frozenset()
        else:
            heldout_docs = list(islice(source.documents(source.open("train")), data.validation_docs))
            heldout = frozenset(document_digest(t) for t in heldout_docs)

        def sample() -> Iterator[str]:  # read only when no cached tokenizer matches: the first training documents
            yield from islice(source.documents(source.open("train"), skip=heldout), data.tokenizer_docs)

        tokenizer = build_tokenizer(cfg, {"train": {"text": sample()}}, source.key())
        tokenizer.model_max_length = seq_len
    packer = packer_for(tokenizer, seq_len)
    blocks = [block for i in range(0, len(heldout_docs), TOKENIZE_BATCH)
              for block in pack_texts(heldout_docs[i:i + TOKENIZE_BATCH], tokenizer, packer)]
    if len(blocks) < accelerator.num_processes:
        what = "validation split" if source.has_validation_split else f"first {len(heldout_docs)} documents"
        raise DataError(f"the held-out {what} of {source.origin} give {len(blocks)} blocks of {seq_len} tokens, "
                        f"fewer than one per process ({accelerator.num_processes}); raise data.validation_docs")
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"), length=seq_len)})
    validation = datasets.Dataset.from_dict({"input_ids": blocks}, features=features)
    train = RankStream(source, tokenizer, seq_len, heldout=heldout, rank=accelerator.process_index,
                       world_size=accelerator.num_processes, seed=cfg.seed, shuffle_buffer=data.shuffle_buffer)
    return tokenizer, {"train": train, "validation": validation}
