"""Text corpora as `datasets.DatasetDict({"train", "validation"})` with a "text" column.

Sources (data.source):
  docs         Python's own documentation, shipped with every interpreter (the default):
               pydoc_data topics + docstrings of standard-library modules, one document per
               topic or module, split into train/validation by a stable hash of its title.
  text_files   local .txt / .json(l) / .csv / .parquet files through `datasets.load_dataset`.
  hf_dataset   any `datasets.load_dataset` name (needs network or a populated HF cache).
  docs_topics  a labelled task from the docs (ssltrain/data/labelled.py), for fine-tuning.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import inspect
import os
import sys
import sysconfig
from pathlib import Path

from omegaconf import DictConfig

from ssltrain.config import select
from ssltrain.data.cache import cached_dir, fingerprint
from ssltrain.data.images import IMAGE_SOURCES
from ssltrain.data.labelled import LABELLED_SOURCES
from ssltrain.errors import ConfigError, DataError

DOCS_CORPUS_VERSION = 1  # bump when the extraction below changes, to invalidate caches
_SKIP_STDLIB_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def pydoc_topic_documents() -> list[dict]:
    """The interpreter's help topics (`help('FOR')`, ...): ~465 KB of reference prose."""
    from pydoc_data.topics import topics

    return [{"title": f"topic:{name}", "source": "topic", "text": topics[name].strip()} for name in sorted(topics)]


def stdlib_docstring_documents(stdlib_dir: str | None = None) -> list[dict]:
    """One document per standard-library module: its docstrings in source order.

    Parsed with `ast`, never imported, so no module's import side effects run.
    """
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_STDLIB_PARTS.intersection(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        parts = [d for d in (_docstring(node) for node in _in_source_order(tree)) if d]
        if parts:
            module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
            docs.append({"title": f"module:{module}", "source": "module", "text": "\n\n".join(parts)})
    return docs


def _in_source_order(node):
    yield node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _in_source_order(child)


def _docstring(node) -> str | None:
    text = ast.get_docstring(node, clean=False)
    return inspect.cleandoc(text) if text else None


def in_validation_split(title: str, fraction: float) -> bool:
    """Stable document-level split: the same title always lands on the same side."""
    bucket = int(hashlib.sha256(title.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < fraction


class DocsCorpus:
    """The embedded default: Python documentation, real English text with no download."""

    @staticmethod
    def check_config(data_cfg: DictConfig) -> None:
        pass

    @staticmethod
    def load(data_cfg: DictConfig, cache_dir: str):
        import datasets

        settings = (DOCS_CORPUS_VERSION, sys.version, sysconfig.get_paths()["stdlib"],
                    data_cfg.min_doc_chars, data_cfg.max_docs, data_cfg.validation_fraction)
        key = fingerprint("docs", *settings)

        def build(tmp: Path) -> None:
            documents = pydoc_topic_documents() + stdlib_docstring_documents()
            documents = [d for d in documents if len(d["text"]) >= data_cfg.min_doc_chars]
            if data_cfg.max_docs:
                documents = documents[: data_cfg.max_docs]
            val = [d for d in documents if in_validation_split(d["title"], data_cfg.validation_fraction)]
            train = [d for d in documents if not in_validation_split(d["title"], data_cfg.validation_fraction)]
            if not train or not val:
                raise DataError(
                    f"the docs corpus gives {len(train)} train and {len(val)} validation documents with "
                    f"data.max_docs={data_cfg.max_docs} and data.validation_fraction="
                    f"{data_cfg.validation_fraction}; raise them"
                )
            datasets.DatasetDict(
                train=datasets.Dataset.from_list(train), validation=datasets.Dataset.from_list(val)
            ).save_to_disk(str(tmp))

        path = cached_dir(Path(cache_dir) / "corpora", f"docs-{key}", build)
        return datasets.load_from_disk(str(path)), key


_EXTENSION_FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
                      ".csv": "csv", ".parquet": "parquet"}
FILE_FORMATS = ("auto", "text", "json", "csv", "parquet")


def expand_paths(paths) -> list[str]:
    """Files named by data.paths: files, directories (searched recursively) and globs."""
    if isinstance(paths, str):
        paths = [paths]
    files: list[str] = []
    for pattern in paths:
        pattern = os.path.expanduser(str(pattern))
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(os.path.exists(m) for m in matches):
            raise ConfigError(f"data.paths: {pattern!r} does not exist (expected a file, directory or glob)")
        for match in matches:
            if os.path.isdir(match):
                found = sorted(str(p) for p in Path(match).rglob("*") if p.suffix in _EXTENSION_FORMATS)
                if not found:
                    raise ConfigError(f"data.paths: directory {match!r} holds no "
                                      f"{'/'.join(sorted(_EXTENSION_FORMATS))} files")
                files.extend(found)
            else:
                files.append(match)
    return files


def _split_and_filter(dataset_dict, data_cfg: DictConfig, origin: str):
    """Keep the text column, drop short documents, carve out validation if there is none."""
    import datasets

    column = data_cfg.text_column
    for split, ds in dataset_dict.items():
        if column not in ds.column_names:
            raise DataError(f"{origin}: split {split!r} has no column data.text_column={column!r}; "
                            f"columns: {', '.join(ds.column_names)}")
    dataset_dict = datasets.DatasetDict({
        split: ds.select_columns([column]).rename_column(column, "text") if column != "text"
        else ds.select_columns(["text"])
        for split, ds in dataset_dict.items()
    })
    min_chars = data_cfg.min_doc_chars
    dataset_dict = dataset_dict.filter(lambda b: [t is not None and len(t) >= max(min_chars, 1) for t in b["text"]],
                                       batched=True)
    if "validation" not in dataset_dict:
        train = dataset_dict["train"]
        if data_cfg.max_docs:
            train = train.select(range(min(len(train), data_cfg.max_docs)))
        if len(train) < 2:
            raise DataError(f"{origin} holds {len(train)} document(s) of at least {max(min_chars, 1)} "
                            "characters; need at least 2 (one to train on, one to hold out)")
        n_val = max(1, round(len(train) * data_cfg.validation_fraction))
        dataset_dict = train.train_test_split(test_size=n_val, seed=0, shuffle=True)
        dataset_dict["validation"] = dataset_dict.pop("test")
    elif data_cfg.max_docs:
        dataset_dict["train"] = dataset_dict["train"].select(range(min(len(dataset_dict["train"]),
                                                                       data_cfg.max_docs)))
    for split in ("train", "validation"):
        if len(dataset_dict[split]) == 0:
            raise DataError(f"{origin}: the {split} split is empty after dropping documents shorter than "
                            f"data.min_doc_chars={min_chars}")
    return dataset_dict


def _not_utf8_message(files: list[str], err: UnicodeDecodeError) -> str:
    """Name the first file that does not decode as UTF-8 (datasets' error does not say which)."""
    import codecs

    for path in files:
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        with open(path, "rb") as f:
            try:
                while chunk := f.read(1 << 20):
                    decoder.decode(chunk)
                    offset += len(chunk)
                decoder.decode(b"", final=True)
            except UnicodeDecodeError as bad:
                return (f"data.paths: {path!r} is not UTF-8 text ({bad.reason} at byte {offset + bad.start}); "
                        "convert it to UTF-8")
    return f"data.paths: a file is not UTF-8 text ({err.reason})"


class TextFilesCorpus:
    """Local files; .txt files give one document per line (datasets' "text" builder)."""

    @staticmethod
    def check_config(data_cfg: DictConfig) -> None:
        if select(data_cfg, "format") not in FILE_FORMATS:
            raise ConfigError(f"data.format={data_cfg.format!r} is unknown; valid: {', '.join(FILE_FORMATS)}")
        files = expand_paths(select(data_cfg, "paths"))
        if data_cfg.format == "auto":
            unknown = [f for f in files if Path(f).suffix not in _EXTENSION_FORMATS]
            if unknown:
                raise ConfigError(f"data.paths: cannot tell the format of {unknown[0]!r}; set data.format to one "
                                  f"of {', '.join(FILE_FORMATS[1:])}")

    @staticmethod
    def load(data_cfg: DictConfig, cache_dir: str):
        import datasets

        files = expand_paths(data_cfg.paths)
        if data_cfg.format != "auto":
            formats = {data_cfg.format}
        else:
            formats = {_EXTENSION_FORMATS[Path(f).suffix] for f in files}
        if len(formats) != 1:
            raise ConfigError(f"data.paths mixes formats {sorted(formats)}; give one kind of file or set data.format")
        empty = [f for f in files if os.path.getsize(f) == 0]
        if len(empty) == len(files):
            raise DataError(f"data.paths: every file is empty ({', '.join(files[:3])})")
        try:
            raw = datasets.load_dataset(formats.pop(), data_files={"train": files})
        except (datasets.exceptions.DatasetGenerationError, ValueError) as err:
            cause = err if isinstance(err, UnicodeDecodeError) else err.__cause__ or err
            if isinstance(cause, UnicodeDecodeError):
                raise DataError(_not_utf8_message(files, cause)) from None
            raise DataError(f"data.paths: cannot read {files[0]!r}: {str(cause).splitlines()[0]}") from None
        corpus = _split_and_filter(raw, data_cfg, f"data.paths={list(files)[:3]}")
        return corpus, fingerprint("text_files", raw["train"]._fingerprint, data_cfg.text_column,
                                   data_cfg.min_doc_chars, data_cfg.max_docs, data_cfg.validation_fraction)


class HFDatasetCorpus:
    """Any `datasets.load_dataset(name)`: wikitext, bookcorpus, a local dataset dir..."""

    @staticmethod
    def check_config(data_cfg: DictConfig) -> None:
        select(data_cfg, "name")

    @staticmethod
    def load(data_cfg: DictConfig, cache_dir: str):
        import datasets

        splits = {"train": data_cfg.train_split}
        if data_cfg.validation_split:
            splits["validation"] = data_cfg.validation_split
        try:
            raw = datasets.DatasetDict({
                ours: datasets.load_dataset(data_cfg.name, data_cfg.config_name, split=theirs,
                                            revision=data_cfg.revision)
                for ours, theirs in splits.items()
            })
        except Exception as err:  # network, missing dataset, bad split: all user-facing here
            raise DataError(f"data.name={data_cfg.name!r} cannot be loaded: "
                            f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}") from None
        corpus = _split_and_filter(raw, data_cfg, f"data.name={data_cfg.name!r}")
        return corpus, fingerprint("hf_dataset", raw["train"]._fingerprint, data_cfg.text_column,
                                   data_cfg.min_doc_chars, data_cfg.max_docs, data_cfg.validation_fraction)


CORPUS_SOURCES = {"docs": DocsCorpus, "text_files": TextFilesCorpus, "hf_dataset": HFDatasetCorpus,
                  **LABELLED_SOURCES,  # labelled text tasks: ssltrain/data/labelled.py
                  **IMAGE_SOURCES}  # images: ssltrain/data/images.py


def load_corpus(data_cfg: DictConfig, cache_dir: str):
    """(DatasetDict with train/validation "text" columns, or "pixels"/"label" for images; fingerprint)."""
    return CORPUS_SOURCES[data_cfg.source].load(data_cfg, cache_dir)
