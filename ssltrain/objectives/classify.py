"""Fine-tuning: a classification head on a (pretrained) backbone, trained on a labelled data group.

Text (data=docs_topics) goes through AutoModelForSequenceClassification, images (data=digits,
image_folder, hf_image_dataset) through AutoModelForImageClassification, so the export in
<run>/final is the plain transformers classifier, with id2label/label2id from the task's class
names: it reloads with the Auto class and runs in pipeline("text-classification"). The backbone
starts from `model.pretrained` (e.g. a pretraining run's <run>/final: its encoder weights load,
the head starts fresh) or from random weights when that is null (the baseline).

Backbone and head. The backbone is the transformers base model (`model.base_model`: BERT's
embeddings + encoder, ResNet's embedder + stages, ...) except a `pooler` child with weights
(BERT's dense + tanh on [CLS]): the pooler belongs to the head, because a masked-LM export has
none and it is task-specific. The backbone is cut into layer groups, bottom-up: the modules
before the layer stack ("embeddings"), then one group per layer (block/stage) of the longest
nn.ModuleList; modules after the stack (a final norm) join the top layer's group.

freeze:
  none      every weight trains.
  backbone  a probe: only the head trains; backbone weights and buffers (BatchNorm statistics)
            stay bit-identical, the backbone runs in eval mode (no dropout) and is not in the
            optimizer.
  gradual   ULMFiT's gradual unfreezing (Howard & Ruder 2018, arXiv:1801.06146): at step s the
            top min(G, s // every) of the G layer groups train with the head, every =
            objective.unfreeze_every or max_steps // (G + 1); so the run has G + 1 equal stages,
            head only first and everything in the last. Frozen groups run in eval mode. One
            process only (DDP fixes the set of trained parameters when it wraps the model).

Learning rates (optimizer.lr x scale; the LR schedule multiplies every group alike): the head at
head_lr_scale, the top backbone group at backbone_lr_scale and each group below it at a further
x layer_lr_decay (ULMFiT's discriminative fine-tuning uses 1/2.6).

Metrics (held-out split and training windows): loss, accuracy, f1/<class> (each a (sum, count)
pair: 2 TP over predicted + true, so the mean over batches and ranks is the exact per-class F1),
and macro_f1, their mean over the classes that occur (Objective.derived_metrics), as in
scikit-learn's f1_score(average="macro").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from ssltrain.data.labelled import has_labels, label_names, stratified_subset
from ssltrain.errors import ConfigError, DataError
from ssltrain.hub import load_config
from ssltrain.models import auto_model_types, build_backbone, model_modality
from ssltrain.objectives.base import Objective, ObjectiveOutput, _a
from ssltrain.objectives.image import check_image_shape
from ssltrain.paths import shipped_options
from ssltrain.spec import Spec

IGNORE_LABEL = -100  # rows that pad the held-out split to whole batches; never counted
FREEZE_MODES = ("none", "backbone", "gradual")
HEAD_TASKS = {"text": "sequence-classification", "image": "image-classification"}


def head_model_types(modality: str) -> frozenset[str]:
    """transformers model types that have a classification head for `modality`."""
    return auto_model_types(HEAD_TASKS[modality])


def has_head(model_cfg, modality: str) -> bool:
    """Whether a model group can classify `modality` data: a transformers classification head for its
    type, and not an encoder-decoder (T5's head feeds a decoder, which a classifier should not need)."""
    return model_cfg.get("attention") != "encoder-decoder" and model_cfg.model_type in head_model_types(modality)


def classifier_models(modality: str) -> list[str]:
    """Shipped model groups for `modality` data that can classify it."""
    return [name for name, model in shipped_options("model").items()
            if model_modality(model) == modality and has_head(model, modality)]


def labelled_data_groups() -> list[str]:
    """Shipped data groups that carry class labels."""
    return [name for name, data in shipped_options("data").items() if has_labels(data)]


def unfrozen_groups(step: int, max_steps: int, n_groups: int, every: int | None = None) -> int:
    """freeze=gradual: how many backbone layer groups, counted from the top, train at optimizer step
    `step`: min(n_groups, step // every), every = `every` or max(1, max_steps // (n_groups + 1))."""
    every = every or max(1, max_steps // (n_groups + 1))
    return min(n_groups, step // every)


# ---------------------------------------------------------------- backbone layer groups

@dataclass
class LayerGroup:
    """Backbone modules that freeze, unfreeze and share a learning rate together."""

    name: str
    modules: list[torch.nn.Module] = field(default_factory=list)
    extra: list[torch.nn.Parameter] = field(default_factory=list)  # parameters set directly on a container

    def parameters(self) -> list[torch.nn.Parameter]:
        seen, params = set(), []
        for p in [q for m in self.modules for q in m.parameters()] + self.extra:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        return params


def _layer_stack(base: torch.nn.Module) -> str | None:
    """Dotted path of the nn.ModuleList holding most of the backbone's weights (BERT's encoder.layer,
    ViT's encoder.layer, ResNet's encoder.stages, GPT-2's h), or None."""
    best, best_size = None, 0
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = name, size
    return best


def layer_groups(base: torch.nn.Module) -> tuple[list[LayerGroup], list[torch.nn.Module]]:
    """(the backbone's layer groups bottom-up, modules of the base model that belong to the head: a
    `pooler` child with weights). See the module docstring."""
    path = _layer_stack(base)
    if path is None:
        return [LayerGroup("backbone", [base])], []
    stem, top, head, extra = [], [], [], []
    node = base
    for depth, part in enumerate(path.split(".")):
        extra += list(node.parameters(recurse=False))
        after = False
        for name, child in node.named_children():
            if name == part:
                after = True
            elif depth == 0 and name == "pooler" and any(True for _ in child.parameters()):
                head.append(child)
            else:
                (top if after else stem).append((name, child))
        node = getattr(node, part)
    groups = []
    if any(True for _, m in stem for _ in m.parameters()) or extra:
        groups.append(LayerGroup("+".join(n for n, _ in stem) or "embeddings", [m for _, m in stem], extra))
    groups += [LayerGroup(f"{path}.{i}", [layer]) for i, layer in enumerate(node)]
    if top:
        named = [n for n, m in top if any(True for _ in m.parameters())]
        groups[-1].name += "".join(f"+{n}" for n in named)
        groups[-1].modules += [m for _, m in top]
    return groups, head


# ---------------------------------------------------------------- data and metrics

@dataclass
class ClassifyCollator:
    """Examples -> {"input_ids", "attention_mask", "labels"} (text; all-padding columns dropped) or
    {"pixels", "labels"} (images). Picklable for DataLoader workers."""

    modality: str

    def __call__(self, columns: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        labels = torch.as_tensor(np.asarray(columns["label"]), dtype=torch.long)
        if self.modality == "image":
            pixels = torch.as_tensor(np.asarray(columns["pixels"]), dtype=torch.float32)
            return {"pixels": pixels, "labels": labels}
        ids = torch.as_tensor(np.asarray(columns["input_ids"]), dtype=torch.long)
        mask = torch.as_tensor(np.asarray(columns["attention_mask"]), dtype=torch.long)
        keep = mask.any(dim=0)  # padding columns (left or right) every row has
        return {"input_ids": ids[:, keep], "attention_mask": mask[:, keep], "labels": labels}


def classification_counts(logits: torch.Tensor, labels: torch.Tensor, n_classes: int):
    """(loss_sum, n, n_correct, true_positives (K,), predicted (K,), actual (K,)) over rows whose label
    is not IGNORE_LABEL."""
    valid = labels != IGNORE_LABEL
    logits, labels = logits[valid].float(), labels[valid]
    loss_sum = F.cross_entropy(logits, labels, reduction="sum")
    pred = logits.argmax(dim=1)
    hit = pred == labels
    return (loss_sum, valid.sum(), hit.sum(), torch.bincount(labels[hit], minlength=n_classes),
            torch.bincount(pred, minlength=n_classes), torch.bincount(labels, minlength=n_classes))


def macro_f1(values: dict[str, float]) -> float | None:
    """Mean of the finite f1/<class> values (classes neither present nor predicted have none)."""
    f1 = [v for k, v in values.items() if k.startswith("f1/") and math.isfinite(v)]
    return sum(f1) / len(f1) if f1 else None


# ---------------------------------------------------------------- the objective

class Classify(Objective):
    modality = "any"  # follows data.modality: text -> sequence classification, image -> image classification
    attention = None
    summary = "fine-tuning: classify texts or images with a task head (freeze none|backbone|gradual)"
    PARAMS: ClassVar[dict[str, Spec]] = {
        "freeze": Spec(choices=FREEZE_MODES),
        "unfreeze_every": Spec(int, low=1, nullable=True),
        "head_lr_scale": Spec(float, low=0.0),
        "backbone_lr_scale": Spec(float, low=0.0),
        "layer_lr_decay": Spec(float, low=0.0, high=1.0, low_open=True),
    }

    @classmethod
    def check_launch(cls, cfg: DictConfig, world_size: int) -> None:
        if cfg.objective.get("freeze") == "gradual" and world_size > 1:
            raise ConfigError(f"objective.freeze=gradual runs on one process ({world_size} launched: DDP "
                              f"fixes the trained parameters when it wraps the model); use freeze=none or backbone")

    @classmethod
    def check_compatible(cls, cfg: DictConfig) -> None:
        data, modality = cfg.data, cfg.data.modality
        if not has_labels(data):
            raise ConfigError(f"objective classify needs labelled data but data={data.source} has no class labels; "
                              f"pick a labelled data group: {', '.join(labelled_data_groups())}")
        models = ", ".join(classifier_models(modality))
        if model_modality(cfg.model) != modality:
            raise ConfigError(f"objective classify on {modality} data (data={data.source}) needs {_a(modality)} "
                              f"model but model={cfg.model.name} is {_a(model_modality(cfg.model))} model; pick one "
                              f"of: {models}")
        if not has_head(cfg.model, modality):
            raise ConfigError(f"objective classify needs a model with a transformers {HEAD_TASKS[modality]} head "
                              f"but model={cfg.model.name} is {cfg.model.model_type} ({cfg.model.attention}); pick "
                              f"one of: {models}")
        if modality == "image":
            check_image_shape(cfg)
        if cfg.model.get("pretrained"):
            cls._check_pretrained(cfg, modality)

    @staticmethod
    def _check_pretrained(cfg: DictConfig, modality: str) -> None:
        path = cfg.model.pretrained
        try:
            config = load_config(path, "model.pretrained")
        except (OSError, ValueError) as err:
            raise ConfigError(f"model.pretrained={path!r} has no readable config: "
                              f"{str(err).strip().splitlines()[0]}") from None
        if config.model_type not in head_model_types(modality) or getattr(config, "is_encoder_decoder", False):
            raise ConfigError(f"model.pretrained={path!r} is a {config.model_type} model, which has no transformers "
                              f"{HEAD_TASKS[modality]} head for data={cfg.data.source}")
        positions = getattr(config, "max_position_embeddings", None)
        seq_len = OmegaConf.select(cfg, "trainer.seq_len")
        if modality == "text" and positions and seq_len and seq_len > positions:
            raise ConfigError(f"trainer.seq_len={seq_len} exceeds the {positions} positions of model.pretrained="
                              f"{path!r}; use trainer.seq_len<={positions}")

    @classmethod
    def build_examples(cls, corpus, tokenizer, cfg: DictConfig, corpus_key: str, world_size: int = 1):
        """train: the labelled training rows (a stratified, seeded data.label_fraction of them), label
        a ClassLabel naming the classes; validation: the held-out rows, padded with ignored copies
        (label IGNORE_LABEL) to whole micro-batches on every process so evaluation sees each row.
        Text is tokenised to trainer.seq_len (truncated, padded); images keep their "pixels"."""
        import datasets

        names = label_names(corpus["train"])
        splits = {}
        for split in ("train", "validation"):
            ds = corpus[split]
            if len(ds) and min(ds["label"]) < 0:  # image folders: images outside the class subfolders
                ds = ds.filter(lambda label: label >= 0, input_columns="label", keep_in_memory=True)
            if split == "train":
                ds = ds.select(stratified_subset(ds["label"], cfg.data.get("label_fraction", 1.0), cfg.seed))
                ds = ds.cast_column("label", datasets.ClassLabel(names=names))
            else:
                ds = ds.cast_column("label", datasets.Value("int64"))
            if tokenizer is not None:
                ds = _tokenize(ds, tokenizer, cfg.trainer.seq_len)
            splits[split] = ds
        if not len(splits["train"]) or not len(splits["validation"]):
            raise DataError(f"data={cfg.data.source} gives {len(splits['train'])} labelled training and "
                            f"{len(splits['validation'])} held-out examples; classification needs both")
        if max(splits["validation"]["label"]) >= len(names):
            raise DataError(f"data={cfg.data.source}: the held-out split has class ids beyond the training split's "
                            f"{len(names)} classes ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
        splits["validation"] = _pad_to_batches(splits["validation"],
                                               cfg.trainer.micro_batch_size * world_size)
        return datasets.DatasetDict(splits)

    @classmethod
    def params_from_examples(cls, examples) -> dict[str, Any]:
        return {"label_names": list(examples["train"].features["label"].names)}

    def __init__(self, *, model_cfg, tokenizer, hardware, label_names: list[str], freeze: str = "none",
                 unfreeze_every: int | None = None, head_lr_scale: float = 1.0, backbone_lr_scale: float = 1.0,
                 layer_lr_decay: float = 1.0):
        super().__init__()
        from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

        self.label_names = list(label_names)
        self.data_modality = "image" if tokenizer is None else "text"
        auto = AutoModelForImageClassification if self.data_modality == "image" else AutoModelForSequenceClassification
        overrides = {"id2label": dict(enumerate(self.label_names)),
                     "label2id": {name: i for i, name in enumerate(self.label_names)},
                     "problem_type": "single_label_classification"}
        self.model = build_backbone(model_cfg, tokenizer, auto, hardware.attn_implementation, overrides)
        self.groups, head_modules = layer_groups(self.model.base_model)
        in_backbone = {id(p) for g in self.groups for p in g.parameters()}
        self.head_params = [p for p in self.model.parameters() if id(p) not in in_backbone]
        self.head_modules = head_modules
        self.freeze, self.unfreeze_every = freeze, unfreeze_every
        self.head_lr_scale, self.backbone_lr_scale, self.layer_lr_decay = head_lr_scale, backbone_lr_scale, \
            layer_lr_decay
        self.collator = ClassifyCollator(self.data_modality)
        self.n_unfrozen = -1
        self.set_unfrozen(len(self.groups) if freeze == "none" else 0)

    # -- freezing
    def backbone_groups_top_down(self) -> list[LayerGroup]:
        return list(reversed(self.groups))

    def set_unfrozen(self, n: int) -> None:
        """Train the top n backbone layer groups (and the head); freeze the rest."""
        if n == self.n_unfrozen:
            return
        self.n_unfrozen = n
        for i, group in enumerate(self.backbone_groups_top_down()):
            for p in group.parameters():
                p.requires_grad_(i < n)
        self._set_modes()

    def _set_modes(self) -> None:
        """Frozen groups run in eval mode while training (no dropout, BatchNorm statistics kept)."""
        if self.training:
            for i, group in enumerate(self.backbone_groups_top_down()):
                for module in group.modules:
                    module.train(i < self.n_unfrozen)

    def train(self, mode: bool = True):
        super().train(mode)
        self._set_modes()
        return self

    def on_step(self, step: int, max_steps: int) -> None:
        if self.freeze == "gradual":
            self.set_unfrozen(unfrozen_groups(step, max_steps, len(self.groups), self.unfreeze_every))

    def param_groups(self) -> list[dict[str, Any]]:
        """The head, then the backbone's layer groups top-down (none with freeze=backbone)."""
        groups = [{"params": self.head_params, "lr_scale": self.head_lr_scale, "name": "head"}]
        if self.freeze != "backbone":
            for depth, group in enumerate(self.backbone_groups_top_down()):
                groups.append({"params": group.parameters(), "name": f"backbone:{group.name}",
                               "lr_scale": self.backbone_lr_scale * self.layer_lr_decay ** depth})
        return groups

    # -- the Objective protocol
    def build_collator(self) -> ClassifyCollator:
        return self.collator

    def export_model(self):
        return self.model

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        labels = batch["labels"]  # (B,)
        if self.data_modality == "image":
            logits = self.model(pixel_values=batch["pixels"]).logits  # (B, K)
            num_tokens = torch.tensor(labels.numel(), device=labels.device)
        else:
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            num_tokens = batch["attention_mask"].sum()
        loss_sum, n, n_correct, tp, predicted, actual = classification_counts(logits, labels, len(self.label_names))
        metrics = {"loss": (loss_sum.detach(), n), "accuracy": (n_correct, n)}
        for k, name in enumerate(self.label_names):
            metrics[f"f1/{name}"] = (2 * tp[k], predicted[k] + actual[k])
        if self.freeze == "gradual":
            one = torch.ones((), device=labels.device)
            metrics["unfrozen_groups"] = (one * self.n_unfrozen, one)
        return ObjectiveOutput(loss=loss_sum / n.clamp(min=1), metrics=metrics, num_tokens=num_tokens)

    def derived_metrics(self, values: dict[str, float]) -> dict[str, float]:
        """Drop f1/<class> of classes absent from the window (nan) and add macro_f1."""
        values = {k: v for k, v in values.items() if not (k.startswith("f1/") and not math.isfinite(v))}
        score = macro_f1(values)
        return values if score is None else {**values, "macro_f1": score}


def _tokenize(ds, tokenizer, seq_len: int):
    """"text" -> input_ids / attention_mask of seq_len tokens (truncated, padded); other columns but
    "label" dropped. In memory: a task's passages tokenise in a second."""
    if tokenizer.pad_token_id is None:
        raise ConfigError("objective=classify needs a tokenizer with a padding token (tokenizer.path=... has none)")

    def encode(batch):
        enc = tokenizer(batch["text"], truncation=True, max_length=seq_len, padding="max_length")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    drop = [c for c in ds.column_names if c != "label"]
    return ds.map(encode, batched=True, remove_columns=drop, keep_in_memory=True, desc="tokenising")


def _pad_to_batches(ds, multiple: int):
    """ds plus copies of its first row labelled IGNORE_LABEL, up to a multiple of `multiple` rows."""
    import datasets

    n_pad = (-len(ds)) % multiple
    if not n_pad:
        return ds
    pad = ds.select([0] * n_pad).map(lambda _: {"label": IGNORE_LABEL}, keep_in_memory=True)
    return datasets.concatenate_datasets([ds, pad])
