"""Resumable, rank-sharded batch loading with per-batch seeded randomness.

Item b of a `BatchDataset` is the collated micro-batch b of one epoch for one rank. The order
of examples is a permutation seeded by (seed, epoch); the collator's randomness (masking,
augmentation) comes from a generator seeded by (seed, epoch, batch, rank). So a batch is the
same whatever the number of DataLoader workers, and resuming at (epoch, batch) needs no
replay of earlier batches: the position in the data is two integers.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, decorrelated (unlike seed + offset)."""
    digest = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class BatchDataset(torch.utils.data.Dataset):
    """Micro-batches of one epoch for one rank. Rank r takes global micro-batch slots
    r, r + world, r + 2*world, ... so ranks see disjoint examples (unless the split is smaller
    than one global micro-batch: then its examples are repeated to fill one).

    drop_last=False (held-out evaluation): the examples left after the last full global
    micro-batch form one more, smaller one, so every example is seen once; a rank whose slot in
    it is empty gets a filler batch of one example (is_filler) to run and discard, so that every
    rank runs the same number of forward passes (FSDP gathers parameters in each)."""

    def __init__(self, examples, collator: Callable, micro_batch_size: int, *, seed: int, epoch: int,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, drop_last: bool = True):
        self.examples = examples  # a datasets.Dataset formatted as numpy (memory-mapped)
        self.collator = collator
        self.micro_batch_size = micro_batch_size
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        n = len(examples)
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(seed, epoch)))
        else:
            order = torch.arange(n)
        # Fewer examples than one global micro-batch (e.g. 2% of a small task's labels): the epoch
        # strings together enough passes over them, each in its own order, to fill one.
        repeats = -(-micro_batch_size * world_size // n) if 0 < n < micro_batch_size * world_size else 1
        for k in range(1, repeats):
            seed_k = derived_seed(seed, epoch, "repeat", k)
            extra = torch.randperm(n, generator=torch.Generator().manual_seed(seed_k)) if shuffle else torch.arange(n)
            order = torch.cat([order, extra])
        self.order = order
        per_batch = micro_batch_size * world_size
        self.num_batches = len(order) // per_batch if drop_last else -(-len(order) // per_batch)

    def __len__(self) -> int:
        return self.num_batches

    def indices(self, b: int) -> list[int]:
        start = (b * self.world_size + self.rank) * self.micro_batch_size
        return self.order[start:start + self.micro_batch_size].tolist()

    def is_filler(self, b: int) -> bool:
        """True when this rank has no examples left in batch b (only with drop_last=False)."""
        return not self.indices(b)

    def __getitem__(self, b: int) -> dict[str, torch.Tensor]:
        if not 0 <= b < self.num_batches:
            raise IndexError(b)
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch, b, self.rank))
        return self.collator(self.examples[self.indices(b) or self.order[:1].tolist()], generator)


@dataclass
class DataPosition:
    """Where the next training micro-batch comes from; saved in every checkpoint. With streaming
    data (ssltrain/data/streaming.py) each rank has its own place in its own stream: `stream`."""

    epoch: int = 0
    batch: int = 0
    stream: dict | None = None

    def to_state(self, gather: Callable[[list], list]) -> dict:
        """The checkpoint's data fields; when streaming, every rank's stream state (gather: a
        collective such as accelerate's gather_object)."""
        state = {"epoch": self.epoch, "batch": self.batch}
        if self.stream is not None:
            state["streams"] = gather([self.stream])
        return state

    @classmethod
    def from_state(cls, state: dict, rank: int) -> DataPosition:
        """This rank's position from a checkpoint's trainer_state."""
        if state.get("streams"):
            stream = state["streams"][rank]
            return cls(stream["epoch"], stream["batch"], stream)
        return cls(state["epoch"], state["batch"])


class RunBatches(torch.utils.data.Dataset):
    """Micro-batch k of the whole run: batch k % per_epoch of epoch k // per_epoch, from
    make_dataset(epoch) (every epoch has the same number of batches). One DataLoader over it serves
    every epoch, so its workers start once per run rather than once per epoch: with a small corpus
    and a GPU-sized batch an epoch lasts seconds, and each restart would leave the GPU waiting for
    the new workers' first batches."""

    def __init__(self, make_dataset: Callable[[int], BatchDataset]):
        self.make_dataset = make_dataset
        self._epoch, self._dataset = 0, make_dataset(0)
        self.per_epoch = len(self._dataset)

    def epoch_dataset(self, epoch: int) -> BatchDataset:
        if epoch != self._epoch:  # each worker keeps the epoch it is in (one permutation, built once)
            dataset = self.make_dataset(epoch)
            if len(dataset) != self.per_epoch:
                raise ValueError(f"epoch {epoch} has {len(dataset)} micro-batches, epoch 0 had {self.per_epoch}")
            self._epoch, self._dataset = epoch, dataset
        return self._dataset

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        epoch, b = divmod(k, self.per_epoch)
        return self.epoch_dataset(epoch)[b]


def make_loader(dataset: torch.utils.data.Dataset, indices: Iterable[int], num_workers: int, pin_memory: bool):
    """A DataLoader over dataset[i] for i in `indices` (an iterable: itertools.count for a whole run).
    The DataLoader draws its worker base seed from its own generator, so it never consumes the
    global torch RNG (dropout)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=indices, num_workers=num_workers,
        pin_memory=pin_memory, generator=torch.Generator().manual_seed(0),
        persistent_workers=False, prefetch_factor=4 if num_workers else None,
    )


def train_batches(make_dataset: Callable[[int], BatchDataset], position: DataPosition, num_workers: int,
                  pin_memory: bool) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches from `position` on, advancing `position` in place after each one."""
    run = RunBatches(make_dataset)
    if run.per_epoch == 0:
        raise ValueError("the training split has fewer examples than one global micro-batch")
    start = position.epoch * run.per_epoch + position.batch
    loader = make_loader(run, itertools.count(start), num_workers, pin_memory)
    for k, batch in enumerate(loader, start=start + 1):
        position.epoch, position.batch = divmod(k, run.per_epoch)
        yield batch


class IndexedTrainData:
    """Training micro-batches from a map-style datasets.Dataset: one BatchDataset per epoch.
    (A stream, data.streaming=true, gives streaming.StreamingTrainData with the same methods.)"""

    def __init__(self, examples, collator: Callable, micro_batch_size: int, *, seed: int, rank: int,
                 world_size: int):
        self.examples = examples.with_format("numpy")
        self.collator, self.micro_batch_size = collator, micro_batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_examples = len(examples)

    def dataset(self, epoch: int) -> BatchDataset:
        return BatchDataset(self.examples, self.collator, self.micro_batch_size, seed=self.seed, epoch=epoch,
                            rank=self.rank, world_size=self.world_size, shuffle=True)

    def first_examples(self, position: DataPosition, n: int) -> list[int]:
        """Indices of the next n examples this rank trains on."""
        return self.dataset(position.epoch).indices(position.batch)[:n]

    def batches(self, position: DataPosition, num_workers: int, pin_memory: bool) -> Iterator[dict[str, torch.Tensor]]:
        return train_batches(self.dataset, position, num_workers, pin_memory)


def build_train_data(examples, collator: Callable, micro_batch_size: int, *, seed: int, rank: int, world_size: int):
    """The training batches' source: build_examples' "train" split is a datasets.Dataset, or a stream
    that was built for this rank and brings its own (`train_data`, ssltrain/data/streaming.py)."""
    if hasattr(examples, "train_data"):
        return examples.train_data(collator, micro_batch_size, seed=seed)
    return IndexedTrainData(examples, collator, micro_batch_size, seed=seed, rank=rank, world_size=world_size)
