"""A labelled text task built from the embedded corpus, for fine-tuning and probes offline.

"Which standard-library package does this documentation passage come from?": the docstrings of
the modules in TOPIC_PACKAGES (8 packages present in CPython 3.10 to 3.13, each with 40-120 KB
of text) are cut into passages of about `passage_chars` characters at paragraph or sentence
boundaries; the label is the top-level package (asyncio, email, ...). The split is a stratified,
seeded split of passages. The pretraining corpus (data=docs) contains this text without labels,
as in the usual transductive setting of pretraining on unlabelled text from the task's domain.

As a data group (`data=docs_topics`, source docs_topics) the task's "test" split is the held-out
"validation" split the loop evaluates on. `stratified_subset` draws the `data.label_fraction`
subsets of training labels (sample-efficiency curves), and `has_labels` says which data groups
carry class labels at all (what `objective=classify` accepts).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from ssltrain.data.cache import cached_dir, fingerprint
from ssltrain.data.docs import stdlib_docstring_documents
from ssltrain.errors import DataError
from ssltrain.spec import Spec, select

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


class DocsTopicsCorpus:
    """`data=docs_topics`: the topic task as a corpus source, DatasetDict(train, validation) of
    {"text", "label", "module"}; validation is the task's stratified test split."""

    @staticmethod
    def check_config(data_cfg: DictConfig) -> None:
        Spec(int, low=20).check("data.passage_chars", select(data_cfg, "passage_chars"))

    @staticmethod
    def load(data_cfg: DictConfig, cache_dir: str):
        import datasets

        task = docs_topic_task(cache_dir, data_cfg.passage_chars, data_cfg.validation_fraction)
        key = fingerprint("docs_topics", LABELLED_VERSION, data_cfg.passage_chars, data_cfg.validation_fraction,
                          TOPIC_PACKAGES)
        return datasets.DatasetDict(train=task["train"], validation=task["test"]), key


LABELLED_SOURCES = {"docs_topics": DocsTopicsCorpus}


def has_labels(data_cfg: DictConfig) -> bool:
    """Whether a data group gives class labels: the topic task and the digits always, an image
    folder through its class subfolders, a hub image dataset when data.label_column is set."""
    source = data_cfg.get("source")
    if source in ("docs_topics", "digits", "image_folder"):
        return True
    return source == "hf_image_dataset" and bool(data_cfg.get("label_column"))


def stratified_subset(labels, fraction: float, seed: int, min_per_class: int = 1) -> np.ndarray:
    """Sorted indices of a stratified, seeded subset of round(fraction x N) examples: split over the
    classes in proportion to their size (largest remainders get the rounding), at least
    `min_per_class` of each class so every class stays present, drawn by one permutation per class
    (in label order) from a numpy generator seeded with `seed`. So for one seed a larger fraction's
    subset contains a smaller one's, and the subset equals ssltrain-probe's for the same labels,
    fraction and seed. fraction 1 keeps everything."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    floor = np.minimum(counts, min_per_class)
    total = int(np.clip(round(fraction * len(labels)), floor.sum(), len(labels)))
    quota = total * counts / max(len(labels), 1)
    take = np.clip(np.floor(quota).astype(int), floor, counts)
    remainder = quota - np.floor(quota)
    while take.sum() < total:  # the rounding goes to the largest remainders, in classes with room
        i = int(np.argmax(np.where(take < counts, remainder, -np.inf)))
        take[i] += 1
        remainder[i] = -1.0
    while take.sum() > total:  # the per-class minimum overshot: take back where most above quota
        take[int(np.argmax(np.where(take > floor, take - quota, -np.inf)))] -= 1
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen)) if chosen else np.arange(0)


def label_names(dataset) -> list[str]:
    """Class names of a labelled split: the ClassLabel's names, else the ids 0..K-1 as strings
    (images: digits, image folders, hub datasets with integer labels)."""
    import datasets

    feature = dataset.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    ids = sorted({int(x) for x in dataset.unique("label")} - {-1})
    if not ids:
        raise DataError("the data has no labelled examples (every label is -1); classification needs classes, "
                        "e.g. one subfolder per class in data.path")
    if ids[0] < 0:
        raise DataError(f"the data has a negative class id {ids[0]}; labels must be 0..K-1 (-1 = unlabelled)")
    return [str(i) for i in range(ids[-1] + 1)]
