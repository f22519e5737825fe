"""A labelled text task built from the embedded corpus, for fine-tuning and probes offline.

"Which standard-library package does this documentation passage come from?": the docstrings of
the modules in TOPIC_PACKAGES (8 packages present in CPython 3.10 to 3.13, each with 40-120 KB
of text) are cut into passages of about `passage_chars` characters at paragraph or sentence
boundaries; the label is the top-level package (asyncio, email, ...). The split is a stratified,
seeded split of passages. The pretraining corpus (data=docs) contains this text without labels,
as in the usual transductive setting of pretraining on unlabelled text from the task's domain.
"""

from __future__ import annotations

import re
from pathlib import Path

from ssltrain.data.cache import cached_dir, fingerprint
from ssltrain.data.corpus import stdlib_docstring_documents

TOPIC_PACKAGES = ("asyncio", "email", "idlelib", "importlib", "logging", "tkinter", "unittest", "xml")
LABELLED_VERSION = 1
_BREAKS = re.compile(r"\n\s*\n|(?<=[.!?])\s+(?=[A-Z(])")


def split_passages(text: str, passage_chars: int) -> list[str]:
    """Greedy passages of about passage_chars characters made of whole paragraphs/sentences;
    pieces shorter than a quarter of that are dropped."""
    passages, current = [], ""
    for piece in (p.strip() for p in _BREAKS.split(text)):
        if not piece:
            continue
        current = f"{current} {piece}".strip() if current else piece
        if len(current) >= passage_chars:
            passages.append(current)
            current = ""
    if len(current) >= passage_chars // 4:
        passages.append(current)
    return passages


def docs_topic_examples(passage_chars: int = 400, packages: tuple[str, ...] = TOPIC_PACKAGES) -> list[dict]:
    """[{"text", "label", "module"}] with label = index of the module's top-level package."""
    examples = []
    for doc in stdlib_docstring_documents():
        module = doc["title"].split(":", 1)[1]
        package = module.split(".")[0]
        if package in packages:
            for passage in split_passages(doc["text"], passage_chars):
                examples.append({"text": passage, "label": packages.index(package), "module": module})
    return examples


def docs_topic_task(cache_dir: str, passage_chars: int = 400, test_fraction: float = 0.2, seed: int = 0):
    """DatasetDict(train, test) of {"text", "label" (ClassLabel over TOPIC_PACKAGES), "module"},
    stratified by label and cached."""
    import datasets

    key = fingerprint(LABELLED_VERSION, passage_chars, test_fraction, seed, TOPIC_PACKAGES)

    def build(tmp: Path) -> None:
        features = datasets.Features({"text": datasets.Value("string"),
                                      "label": datasets.ClassLabel(names=list(TOPIC_PACKAGES)),
                                      "module": datasets.Value("string")})
        full = datasets.Dataset.from_list(docs_topic_examples(passage_chars), features=features)
        full.train_test_split(test_size=test_fraction, seed=seed, stratify_by_column="label").save_to_disk(str(tmp))

    return datasets.load_from_disk(str(cached_dir(Path(cache_dir) / "tasks", f"docs-topics-{key}", build)))
