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

import glob
import hashlib
import os
import re
import sys
import sysconfig
from pathlib import Path

from omegaconf import DictConfig

from ssltrain.data.cache import cached_dir, dataset_fingerprint, fingerprint, hub_load_errors
from ssltrain.data.docs import pydoc_topic_documents, stdlib_docstring_documents
from ssltrain.data.images import IMAGE_SOURCES
from ssltrain.data.labelled import LABELLED_SOURCES
from ssltrain.errors import ConfigError, DataError
from ssltrain.spec import select

DOCS_CORPUS_VERSION = 1  # bump when the extraction below changes, to invalidate caches
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
        if not _is_text(ds.features[column]):
            raise DataError(f"{origin}: split {split!r} column data.text_column={column!r} holds "
                            f"{ds.features[column]}, not strings; name a text column")
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
    """Name the first file that does not decode as UTF-8, and the line (datasets' error says neither)."""
    for path in files:
        problem = _not_utf8_line(path)
        if problem:
            return f"data.paths: {path!r} {problem}"
    return f"data.paths: a file is not UTF-8 text ({err.reason})"


def _not_utf8_line(path: str) -> str | None:
    """Why the file at `path` is not UTF-8 text, naming the 1-based line, or None if it is. Line by
    line is exact: the newline byte never occurs inside a UTF-8 multi-byte sequence."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad:
                return (f"line {lineno} is not UTF-8 text ({bad.reason} at byte {offset + bad.start} of the file); "
                        f"convert it to UTF-8")
            offset += len(line)
    return None


def _json_kind(value) -> str:
    if isinstance(value, bool):
        return "a JSON boolean"
    if isinstance(value, (int, float)):
        return "a JSON number"
    return {list: "a JSON array", dict: "a JSON object", str: "a JSON string"}.get(type(value), "a JSON null")


def _shown(value) -> str:
    import json

    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _record_problem(record, column: str) -> str | None:
    """Why one JSON record gives no document text: not an object, or its text is no string. A
    missing or null text is no problem here (the record is dropped like an empty document)."""
    if not isinstance(record, dict):
        return f"is {_shown(record)}, {_json_kind(record)}, not an object like {{\"{column}\": \"...\"}}"
    value = record.get(column)
    if value is None or isinstance(value, str):
        return None
    return (f"has {column!r} = {_shown(value)}, {_json_kind(value)}, not a string; the text of every document "
            f"must be a JSON string (data.text_column={column!r})")


def _bad_json_line(path: str, column: str) -> str | None:
    """The first line (JSON Lines) or record (a JSON array, or one object over several lines) of
    the file that gives no document, and why; None when every one does."""
    import json

    with open(path, encoding="utf-8-sig") as f:
        if f.read(4096).lstrip().startswith("["):
            try:
                return _bad_json_document(_read_json(path), column)
            except json.JSONDecodeError as err:
                return f"line {err.lineno} is not valid JSON ({err.msg} at column {err.colno})"
        f.seek(0)
        first = True
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                if first:  # perhaps one JSON value written over several lines
                    try:
                        return _bad_json_document(_read_json(path), column)
                    except json.JSONDecodeError:
                        pass
                return f"line {lineno} is not valid JSON ({err.msg} at column {err.colno})"
            first = False
            problem = _record_problem(record, column)
            if problem:
                return f"line {lineno} {problem}"
    return None


def _read_json(path: str):
    import json

    with open(path, encoding="utf-8-sig") as f:
        return json.load(f)


def _bad_json_document(document, column: str) -> str | None:
    """Why a file's one JSON value (an array of records or strings, or one record) gives no
    documents; None when it does."""
    if not isinstance(document, list):
        problem = _record_problem(document, column)
        return f"holds one JSON value that {problem}" if problem else None
    for i, record in enumerate(document, 1):
        if isinstance(record, str):  # datasets reads an array of strings as the text column
            continue
        problem = _record_problem(record, column)
        if problem:
            return f"record {i} of its JSON array {problem}"
    return None


def _csv_rows(path: str):
    """(1-based line where the row starts, row) for each row of a CSV file; csv.Error names the line."""
    import csv

    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, strict=True)
        start = 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                if "end of data" in str(err) or "EOF" in str(err):
                    raise csv.Error(f"line {start} opens a quoted field that never closes") from None
                raise csv.Error(f"line {start}: {err}") from None
            yield start, row
            start = reader.line_num + 1


def _csv_header_problem(path: str, column: str) -> str | None:
    """Why the header of the CSV file names no text column, or None (also when it cannot be read:
    the later reading error says why)."""
    import csv

    try:
        header = next((row for _, row in _csv_rows(path)), None)
    except (UnicodeDecodeError, csv.Error):
        return None
    if header is None or column in header:
        return None
    return (f"line 1 (the header) has no column data.text_column={column!r}; its columns: "
            f"{', '.join(header[:10]) or '(none)'}; set data.text_column to the one holding the text")


def _bad_csv_line(path: str, column: str) -> str | None:
    """The first row of the CSV file that pandas would not read, and why; None when none."""
    import csv

    try:
        rows = _csv_rows(path)
        _, header = next(rows, (1, None))
        if header is None:
            return None
        for lineno, row in rows:
            if len(row) > len(header):
                return (f"line {lineno} has {len(row)} fields but the header (line 1) has {len(header)}; quote "
                        f"fields that contain the separator")
    except csv.Error as err:
        return str(err)
    return _csv_header_problem(path, column)


def _parquet_problem(path: str, column: str) -> str | None:
    """Why the Parquet file gives no text column (unreadable, no such column, not strings), or None."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        return f"is not a readable Parquet file ({_first_line(err)})"
    if column not in schema.names:
        return (f"has no column data.text_column={column!r}; its columns: {', '.join(schema.names[:10])}; set "
                f"data.text_column to the one holding the text")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        return f"has column {column!r} of type {kind}, not strings; store the text as a string column"
    return None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _first_bad_line(files: list[str], fmt: str, column: str) -> str | None:
    """The first file that gives no documents and why, naming its 1-based line or record; None when
    no file shows a problem. Reads every file: called only once loading has gone wrong."""
    check = {"json": _bad_json_line, "csv": _bad_csv_line, "parquet": _parquet_problem}.get(fmt)
    for path in files:
        problem = (None if fmt == "parquet" else _not_utf8_line(path)) or (check(path, column) if check else None)
        if problem:
            return f"data.paths: {path!r} {problem}"
    return None


def _is_text(feature) -> bool:
    """Whether a datasets feature holds strings (or nothing but nulls)."""
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "null")


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
        fmt, column = formats.pop(), data_cfg.text_column
        # Cheap checks of every file's header or schema first; reading row by row waits for a failure.
        early = {"csv": _csv_header_problem, "parquet": _parquet_problem}.get(fmt)
        for path in files if early else ():
            problem = early(path, column) if path not in empty else None
            if problem:
                raise DataError(f"data.paths: {path!r} {problem}")
        # CSV has no types: the text column is text even where it looks like numbers ("1", "2.50").
        options = {"converters": {column: str}} if fmt == "csv" else {}
        try:
            raw = datasets.load_dataset(fmt, data_files={"train": files}, **options)
        except (datasets.exceptions.DatasetGenerationError, ValueError) as err:
            cause = err if isinstance(err, UnicodeDecodeError) else err.__cause__ or err
            problem = _first_bad_line(files, fmt, column)
            if problem:
                raise DataError(problem) from None
            if isinstance(cause, UnicodeDecodeError):
                raise DataError(_not_utf8_message(files, cause)) from None
            where = repr(files[0]) if len(files) == 1 else f"one of {len(files)} files ({', '.join(files[:3])}...)"
            # pyarrow's "in row N" counts from 0 within a block, not lines of the file: left out.
            reason = re.sub(r" in row \d+$", "", _first_line(cause))
            raise DataError(f"data.paths: cannot read {where}: {reason}") from None
        feature = raw["train"].features.get(column)
        if feature is not None and not _is_text(feature):
            problem = _first_bad_line(files, fmt, column)
            if problem:
                raise DataError(problem)
        corpus = _split_and_filter(raw, data_cfg, f"data.paths={list(files)[:3]}")
        return corpus, fingerprint("text_files", dataset_fingerprint(raw["train"]), data_cfg.text_column,
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
        except hub_load_errors() as err:  # network, missing dataset, bad split: all user-facing here
            raise DataError(f"data.name={data_cfg.name!r} cannot be loaded: "
                            f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}") from None
        corpus = _split_and_filter(raw, data_cfg, f"data.name={data_cfg.name!r}")
        return corpus, fingerprint("hf_dataset", dataset_fingerprint(raw["train"]), data_cfg.text_column,
                                   data_cfg.min_doc_chars, data_cfg.max_docs, data_cfg.validation_fraction)


CORPUS_SOURCES = {"docs": DocsCorpus, "text_files": TextFilesCorpus, "hf_dataset": HFDatasetCorpus,
                  **LABELLED_SOURCES,  # labelled text tasks: ssltrain/data/labelled.py
                  **IMAGE_SOURCES}  # images: ssltrain/data/images.py


def load_corpus(data_cfg: DictConfig, cache_dir: str):
    """(DatasetDict with train/validation "text" columns, or "pixels"/"label" for images; fingerprint)."""
    return CORPUS_SOURCES[data_cfg.source].load(data_cfg, cache_dir)
