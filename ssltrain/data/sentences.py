"""Sentence-level examples: documents split into segments, tokenised once, then turned into
BERT sentence pairs (NSP / SOP) or single sentences (SimCSE).

Segments: a document is cut on blank lines (paragraphs), then inside a paragraph after '.', '!'
or '?' followed by whitespace and a capital letter or an opening bracket/quote. The rule is
deterministic and keeps every segment a verbatim substring of its document (code blocks stay
whole paragraphs). Segments that tokenise to nothing are dropped.

Pairs follow BERT's create_pretraining_data.py (Devlin et al. 2019): segments of one document
are gathered until they reach a target length (trainer.seq_len - 3; with probability
short_seq_prob a random shorter one), A is a random-length prefix of that chunk, and B is

  label 0: the rest of the chunk, the true continuation of A;
  label 1: for NSP, a run of segments from a random segment of ANOTHER document of the same
           split (the chunk's unused segments are put back); for SOP (ALBERT, Lan et al.
           2019), the same two consecutive segments in swapped order (B A).

Two deliberate changes from BERT's script: the label is drawn 50/50 for every pair, so the
balance is exact in expectation (BERT forced 'random next' whenever a chunk had one segment,
which skews it); a one-segment chunk takes the document's next segment as well so a true pair
exists, and is dropped at the end of a document. When a pair is too long, the longer side is
cut, A from its front and B from its back, so a positive pair stays a contiguous stretch of
its document across the A|B boundary (BERT cut either end at random).

Every random choice comes from a random.Random seeded by (seed, split, round, document index),
so the examples do not depend on datasets.map batching or num_proc.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ssltrain.data.blocks import tokenizer_fingerprint
from ssltrain.data.cache import cached_dir, dataset_fingerprint, fingerprint
from ssltrain.data.loader import derived_seed
from ssltrain.errors import ConfigError, DataError

SENTENCES_VERSION = 1  # bump when segmenting or pairing below changes, to invalidate caches
PAIR_TASKS = ("nsp", "sop")
IS_NEXT, NOT_NEXT = 0, 1  # the HF convention: 0 = B continues A (in order), 1 = random (NSP) / swapped (SOP)

_PARAGRAPH = re.compile(r"\n[ \t]*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'\[`])")


def split_segments(text: str) -> list[str]:
    """Paragraphs (blank-line separated), each cut at sentence ends; stripped, non-empty."""
    segments = []
    for paragraph in _PARAGRAPH.split(text):
        for sentence in _SENTENCE_END.split(paragraph.strip()):
            sentence = sentence.strip()
            if sentence:
                segments.append(sentence)
    return segments


def tokenize_segments(corpus, tokenizer, num_proc: int | None = None):
    """{"text"} documents -> {"segments": list of token-id lists}, one row per document.
    Rows keep the corpus order (the row index is the document index used in pairs)."""
    import datasets

    features = datasets.Features({"segments": datasets.Sequence(datasets.Sequence(datasets.Value("int32")))})

    def tokenize(batch):
        per_doc = [split_segments(text or "") for text in batch["text"]]
        flat = [s for doc in per_doc for s in doc]
        ids = tokenizer(flat, add_special_tokens=False, verbose=False)["input_ids"] if flat else []
        out, k = [], 0
        for doc in per_doc:
            out.append([seg for seg in ids[k:k + len(doc)] if seg])
            k += len(doc)
        return {"segments": out}

    key = tokenizer_fingerprint(tokenizer)
    return datasets.DatasetDict({
        split: ds.map(tokenize, batched=True, batch_size=256, remove_columns=ds.column_names, features=features,
                      num_proc=num_proc, new_fingerprint=fingerprint(SENTENCES_VERSION, dataset_fingerprint(ds), key),
                      desc=f"splitting {split} into sentences")
        for split, ds in corpus.items()
    })


def truncate_pair(a: list[int], b: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
    """Cut the longer side one token at a time until len(a) + len(b) <= max_tokens (B on ties, as
    BERT's truncate_seq_pair); A loses tokens at its front and B at its back."""
    la, lb = len(a), len(b)
    excess = la + lb - max_tokens
    if excess <= 0:
        return a, b
    gap = min(excess, abs(la - lb))
    if la > lb:
        la -= gap
    else:
        lb -= gap
    excess -= gap
    la, lb = la - excess // 2, lb - (excess - excess // 2)
    return a[len(a) - la:], b[:lb]


def document_pairs(segments: list[list[int]], max_tokens: int, rng: random.Random, pair_task: str,
                   short_seq_prob: float, other_document: Callable[[], tuple[int, list[list[int]]]] | None):
    """Sentence pairs from one document's token segments: a list of (tokens_a, tokens_b, label,
    other_doc) where other_doc is the index of B's document for NSP negatives, else None.

    other_document(): (index, segments) of a random different document (NSP only)."""
    target = max_tokens
    if rng.random() < short_seq_prob:
        target = rng.randint(2, max_tokens)
    pairs = []
    chunk: list[list[int]] = []
    length, i = 0, 0
    while i < len(segments):
        chunk.append(segments[i])
        length += len(segments[i])
        if i == len(segments) - 1 or length >= target:
            if len(chunk) == 1 and i + 1 < len(segments):
                i += 1  # one long segment: take the next as well, so that a true continuation exists
                chunk.append(segments[i])
            if len(chunk) >= 2:
                a_end = rng.randint(1, len(chunk) - 1)
                tokens_a = [t for seg in chunk[:a_end] for t in seg]
                label = NOT_NEXT if rng.random() < 0.5 else IS_NEXT
                other = None
                if label == NOT_NEXT and pair_task == "nsp":
                    other, other_segments = other_document()
                    target_b = max(1, target - len(tokens_a))
                    tokens_b = []
                    for seg in other_segments[rng.randint(0, len(other_segments) - 1):]:
                        tokens_b.extend(seg)
                        if len(tokens_b) >= target_b:
                            break
                    i -= len(chunk) - a_end  # the chunk's unused segments start the next chunk
                else:
                    tokens_b = [t for seg in chunk[a_end:] for t in seg]
                tokens_a, tokens_b = truncate_pair(tokens_a, tokens_b, max_tokens)
                if label == NOT_NEXT and pair_task == "sop":
                    tokens_a, tokens_b = tokens_b, tokens_a
                pairs.append((tokens_a, tokens_b, label, other))
            chunk, length = [], 0
        i += 1
    return pairs


def special_ids(tokenizer, objective: str) -> tuple[int, int, int]:
    """(cls, sep, pad) ids; a tokenizer without them cannot frame sentence pairs."""
    cls_id, sep_id = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if cls_id is None or sep_id is None or pad_id is None:
        raise ConfigError(f"objective={objective} needs a tokenizer with [CLS], [SEP] and [PAD] tokens; use "
                          f"tokenizer.type=wordpiece or a tokenizer.path that defines them")
    return cls_id, sep_id, pad_id


def build_pair_examples(corpus, tokenizer, *, seq_len: int, pair_task: str, short_seq_prob: float,
                        dupe_factor: int, seed: int, cache_dir: str, corpus_key: str, num_proc: int | None = None,
                        objective: str = "nsp"):
    """DatasetDict(train, validation) of "[CLS] A [SEP] B [SEP]" pairs padded to seq_len, cached:
    input_ids, token_type_ids, length (real tokens), pair_label (IS_NEXT / NOT_NEXT), and the
    document indices doc_a, doc_b (within the split) that the tests check. The validation split
    gets one round (dupe_factor applies to train) and both are shuffled once, so held-out
    batches mix documents."""
    import datasets
    import pyarrow.compute as pc

    if pair_task not in PAIR_TASKS:
        raise ConfigError(f"objective.pair_task={pair_task!r} is unknown; valid: {', '.join(PAIR_TASKS)}")
    cls_id, sep_id, pad_id = special_ids(tokenizer, objective)
    key = fingerprint(SENTENCES_VERSION, "pairs", corpus_key, tokenizer_fingerprint(tokenizer), seq_len, pair_task,
                      short_seq_prob, dupe_factor, seed)
    max_tokens = seq_len - 3  # [CLS] A [SEP] B [SEP]
    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32"), length=seq_len),
        "token_type_ids": datasets.Sequence(datasets.Value("int8"), length=seq_len),
        "length": datasets.Value("int32"),
        "pair_label": datasets.Value("int8"),
        "doc_a": datasets.Value("int32"),
        "doc_b": datasets.Value("int32"),
    })

    def build(tmp: Path) -> None:
        tokenized = tokenize_segments(corpus, tokenizer, num_proc)
        out = datasets.DatasetDict()
        for split, docs in tokenized.items():
            # Negatives come from documents with at least one segment, never from A's own document.
            candidates = np.flatnonzero(pc.list_value_length(docs.data.column("segments")).to_numpy(
                zero_copy_only=False) > 0)
            if pair_task == "nsp" and len(candidates) < 2:
                raise DataError(f"objective={objective} draws negatives from other documents but the {split} split "
                                f"holds {len(candidates)} non-empty document(s); add documents or raise "
                                f"data.validation_fraction")
            rounds = dupe_factor if split == "train" else 1

            def make_pairs(batch, indices, split=split, docs=docs, candidates=candidates, rounds=rounds):
                rows = {name: [] for name in features}
                for segments, doc in zip(batch["segments"], indices):
                    own = int(np.searchsorted(candidates, doc))  # doc has segments, so candidates[own] == doc
                    for round_ in range(rounds):
                        rng = random.Random(derived_seed(seed, _split_number(split), round_, doc))

                        def other_document(rng=rng, own=own):
                            k = rng.randrange(len(candidates) - 1)
                            j = int(candidates[k + (k >= own)])
                            return j, docs[j]["segments"]

                        for a, b, label, other in document_pairs(segments, max_tokens, rng, pair_task,
                                                                 short_seq_prob, other_document):
                            ids = [cls_id, *a, sep_id, *b, sep_id]
                            n = len(ids)
                            rows["input_ids"].append(ids + [pad_id] * (seq_len - n))
                            rows["token_type_ids"].append([0] * (len(a) + 2) + [1] * (len(b) + 1) + [0] * (seq_len - n))
                            rows["length"].append(n)
                            rows["pair_label"].append(label)
                            rows["doc_a"].append(doc)
                            rows["doc_b"].append(doc if other is None else other)
                return rows

            pairs = docs.map(make_pairs, batched=True, batch_size=64, with_indices=True, remove_columns=["segments"],
                             features=features, num_proc=num_proc,
                             new_fingerprint=fingerprint(key, split, dataset_fingerprint(docs)),
                             desc=f"building {split} {pair_task} pairs")
            if len(pairs) == 0:
                raise DataError(f"the {split} split gives no sentence pair: its documents have fewer than two "
                                f"sentences; add text or raise data.validation_fraction")
            out[split] = pairs.shuffle(seed=derived_seed(seed, _split_number(split)) % 2**32)
        out.save_to_disk(str(tmp))

    path = cached_dir(Path(cache_dir) / "pairs", f"{pair_task}-{key}", build)
    return datasets.load_from_disk(str(path))


def build_sentence_examples(corpus, tokenizer, *, seq_len: int, min_tokens: int, seed: int, cache_dir: str,
                            corpus_key: str, num_proc: int | None = None, objective: str = "simcse"):
    """DatasetDict(train, validation) of single segments "[CLS] s [SEP]" padded to seq_len (cut at
    seq_len), cached: input_ids, length. Segments with fewer than min_tokens tokens are dropped,
    and exact duplicates within a split are kept once (a duplicate in a batch would be a false
    negative for a contrastive loss). Shuffled once, so batches mix documents."""
    import datasets

    cls_id, sep_id, pad_id = special_ids(tokenizer, objective)
    key = fingerprint(SENTENCES_VERSION, "sentences", corpus_key, tokenizer_fingerprint(tokenizer), seq_len,
                      min_tokens, seed)
    body = seq_len - 2
    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32"), length=seq_len),
        "length": datasets.Value("int32"),
        "hash": datasets.Value("int64"),
    })

    def flatten(batch):
        rows = {"input_ids": [], "length": [], "hash": []}
        for segments in batch["segments"]:
            for seg in segments:
                if len(seg) < min_tokens:
                    continue
                seg = seg[:body]  # what the model sees; duplicates are judged on it
                ids = [cls_id, *seg, sep_id]
                rows["input_ids"].append(ids + [pad_id] * (seq_len - len(ids)))
                rows["length"].append(len(ids))
                digest = hashlib.blake2b(np.asarray(seg, dtype=np.int32).tobytes(), digest_size=8).digest()
                rows["hash"].append(int.from_bytes(digest, "little", signed=True))
        return rows

    def build(tmp: Path) -> None:
        tokenized = tokenize_segments(corpus, tokenizer, num_proc)
        out = datasets.DatasetDict()
        for split, docs in tokenized.items():
            rows = docs.map(flatten, batched=True, batch_size=256, remove_columns=["segments"], features=features,
                            num_proc=num_proc, new_fingerprint=fingerprint(key, split, dataset_fingerprint(docs)),
                            desc=f"collecting {split} sentences")
            _, first = np.unique(np.asarray(rows["hash"], dtype=np.int64), return_index=True)
            rows = rows.select(np.sort(first)).remove_columns(["hash"])
            if len(rows) < 2:
                raise DataError(f"the {split} split gives {len(rows)} sentence(s) of at least objective.min_tokens="
                                f"{min_tokens} tokens; add text, lower min_tokens or raise data.validation_fraction")
            out[split] = rows.shuffle(seed=derived_seed(seed, _split_number(split)) % 2**32)
        out.save_to_disk(str(tmp))

    path = cached_dir(Path(cache_dir) / "sentences", f"sentences-{key}", build)
    return datasets.load_from_disk(str(path))


def _split_number(split: str) -> int:
    return {"train": 0, "validation": 1}.get(split, 2)
