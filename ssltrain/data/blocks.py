"""Tokenise documents once (datasets.map, cached on disk) and pack them into fixed-length blocks.

A block is `seq_len` token ids: for tokenizers with a [CLS] token it starts with [CLS];
documents are concatenated with the separator ([SEP] or <|endoftext|>) between them, so no
position is spent on padding. The tail of each map batch that does not fill a block is dropped.
"""

from __future__ import annotations

from pathlib import Path

from ssltrain.data.cache import cached_dir, fingerprint
from ssltrain.errors import DataError

BLOCKS_VERSION = 1


def separator_id(tokenizer) -> int:
    """Token between packed documents: [SEP] for BERT-style vocabularies, else end-of-text."""
    for name in ("sep_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return value
    raise DataError("the tokenizer has neither a sep nor an eos token to separate packed documents")


def pack_ids(docs: list[list[int]], seq_len: int, sep_id: int, prefix: list[int]) -> list[list[int]]:
    """Concatenate documents (each followed by sep_id) and cut into blocks of seq_len tokens,
    each block = prefix + body. A trailing partial block is dropped."""
    body_len = seq_len - len(prefix)
    stream = [tok for doc in docs for tok in (*doc, sep_id)]
    n_blocks = len(stream) // body_len
    return [prefix + stream[i * body_len:(i + 1) * body_len] for i in range(n_blocks)]


def tokenizer_fingerprint(tokenizer) -> str:
    return fingerprint(tokenizer.backend_tokenizer.to_str(), tokenizer.all_special_ids)


def build_blocks(corpus, tokenizer, seq_len: int, cache_dir: str, corpus_key: str, num_proc: int | None = None):
    """DatasetDict of {"input_ids": int32[seq_len]} blocks per split, memory-mapped from the cache."""
    import datasets

    key = fingerprint(BLOCKS_VERSION, corpus_key, tokenizer_fingerprint(tokenizer), seq_len)
    sep = separator_id(tokenizer)
    prefix = [tokenizer.cls_token_id] if getattr(tokenizer, "cls_token_id", None) is not None else []

    def tokenize(batch):
        return {"ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]}

    def pack(batch):
        return {"input_ids": pack_ids(batch["ids"], seq_len, sep, prefix)}

    def build(tmp: Path) -> None:
        features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"), length=seq_len)})
        out = datasets.DatasetDict()
        for split, ds in corpus.items():
            ids = ds.map(tokenize, batched=True, remove_columns=ds.column_names, num_proc=num_proc,
                         desc=f"tokenising {split}")
            out[split] = ids.map(pack, batched=True, batch_size=1000, remove_columns=["ids"], features=features,
                                 num_proc=num_proc, desc=f"packing {split} into {seq_len}-token blocks")
        for split, ds in out.items():
            if len(ds) == 0:
                raise DataError(f"the {split} split gives no {seq_len}-token block; it holds "
                                f"{len(corpus[split])} short document(s): add text, lower trainer.seq_len "
                                f"or raise data.validation_fraction")
        out.save_to_disk(str(tmp))

    path = cached_dir(Path(cache_dir) / "blocks", f"blocks-{key}", build)
    return datasets.load_from_disk(str(path))
