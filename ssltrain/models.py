"""Build backbones from transformers config classes: no hub access, any registered model type."""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from ssltrain.errors import ConfigError
from ssltrain.hub import load_model, load_tokenizer

VOCAB_MULTIPLE = 64  # pad the embedding matrix so GPU matmuls hit tensor-core friendly shapes


def padded_vocab_size(n_tokens: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-n_tokens // multiple) * multiple


def model_modality(model_cfg: DictConfig) -> str:
    """"text" for models that read tokens, "image" for those with no tokenizer (tokenizer_type: null)."""
    return "text" if model_cfg.get("tokenizer_type") else "image"


def build_model_config(model_cfg: DictConfig, vocab_size: int | None, tokenizer=None):
    """A transformers PretrainedConfig for `model_cfg.model_type` with the vocab padded to 64
    (vocab_size None: an image model, no vocabulary).

    With a tokenizer, its special-token ids go into the config so exports generate and
    fill masks correctly.
    """
    from transformers import CONFIG_MAPPING, AutoConfig

    if model_cfg.model_type not in CONFIG_MAPPING:
        raise ConfigError(
            f"model.model_type={model_cfg.model_type!r} is not a transformers model type; "
            f"e.g. bert, roberta, gpt2, llama (see transformers.CONFIG_MAPPING)"
        )
    kwargs = OmegaConf.to_container(model_cfg.config, resolve=True) if model_cfg.get("config") else {}
    if vocab_size is not None:
        kwargs["vocab_size"] = padded_vocab_size(vocab_size)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        if value is not None:
            kwargs[name] = value
        elif tokenizer is None and vocab_size is not None:
            # No tokenizer yet (validation): none of the model type's defaults (GPT-2's 50256), which
            # may lie outside the run's vocabulary and make transformers warn.
            kwargs.setdefault(name, None)
    try:
        config = AutoConfig.for_model(model_cfg.model_type, **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.config for model={model_cfg.name} is invalid: {_first_line(err)}") from None
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if isinstance(heads, int) and isinstance(hidden, int) and heads > 0 and hidden % heads:
        raise ConfigError(
            f"model={model_cfg.name}: hidden size {hidden} is not divisible by {heads} attention heads"
        )
    return config


def max_positions(config) -> int | None:
    """Longest sequence the config's position embeddings allow (None when unbounded, e.g. T5)."""
    return getattr(config, "max_position_embeddings", None)


def build_backbone(model_cfg: DictConfig, tokenizer, auto_class, attn_implementation: str = "sdpa",
                   config_overrides: dict | None = None):
    """A randomly initialised model from `model_cfg`, or the weights at `model.pretrained`.

    auto_class: the transformers Auto* class whose head the objective needs, e.g.
    AutoModelForMaskedLM or AutoModelForCausalLM. tokenizer: None for image models.
    config_overrides: config attributes the objective sets either way, e.g. a task head's
    id2label / label2id (which give num_labels).
    """
    # Attention-free models (model.attention: none, e.g. ResNet) reject an attention kernel choice.
    attn = {} if model_cfg.attention == "none" else {"attn_implementation": attn_implementation}
    overrides = dict(config_overrides or {})
    if model_cfg.pretrained:
        path = os.path.expanduser(model_cfg.pretrained)
        try:
            model = load_model(auto_class, path, "model.pretrained", **attn, **overrides)
        except (OSError, ValueError) as err:
            raise ConfigError(f"model.pretrained={path!r} cannot be loaded as {auto_class.__name__}: "
                              f"{_first_line(err)}") from None
        if tokenizer is not None:
            check_tokenizer_fits(path, model.get_input_embeddings().num_embeddings, tokenizer)
        return model
    config = build_model_config(model_cfg, vocab_size=len(tokenizer) if tokenizer is not None else None,
                                tokenizer=tokenizer)
    for name, value in overrides.items():
        setattr(config, name, value)
    try:
        return auto_class.from_config(config, **attn)
    except ValueError as err:
        raise ConfigError(f"model={model_cfg.name} cannot be built as {auto_class.__name__}: "
                          f"{_first_line(err)}") from None


def check_tokenizer_fits(path: str, n_embeddings: int, tokenizer) -> None:
    """Refuse a tokenizer other than the one the model at `path` was trained with: its ids would index
    unrelated embedding rows. The model's own tokenizer is the one saved beside it (every export has
    one). Without one, the tokenizer must fill the embedding matrix up to its padding to
    VOCAB_MULTIPLE, unless it was loaded from `path` itself (a hub name)."""
    n_tokens = len(tokenizer)
    own = _saved_tokenizer(path)
    if own is not None and own.get_vocab() != tokenizer.get_vocab():
        model_side = f"was trained with a {len(own)}-token vocabulary"
    elif n_tokens > n_embeddings or (own is None and tokenizer.name_or_path != path
                                     and padded_vocab_size(n_tokens) < n_embeddings):
        model_side = f"has {n_embeddings} token embeddings"
    else:
        return
    raise ConfigError(f"model.pretrained={path!r} {model_side} but the tokenizer in use has {n_tokens} tokens: "
                      f"its ids would index unrelated embeddings; use the tokenizer the model was trained with "
                      f"(the one saved beside it, or tokenizer.path=<that tokenizer>)")


def _saved_tokenizer(path: str):
    """The tokenizer saved in the model folder `path`, or None (no such folder, none saved there)."""
    if not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        return None
    try:
        return load_tokenizer(path, "model.pretrained")
    except (OSError, ValueError):
        return None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# transformers' Auto-class tables (model type -> class name) of the heads ssltrain's objectives use.
AUTO_TABLES = {
    "sequence-classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "image-classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "next-sentence-prediction": "MODEL_FOR_NEXT_SENTENCE_PREDICTION_MAPPING_NAMES",
}


def auto_model_types(task: str) -> frozenset[str]:
    """The transformers model types with an Auto class for `task` (a key of AUTO_TABLES). Private:
    transformers.models.auto.modeling_auto.*_MAPPING_NAMES, the tables the Auto classes are built from."""
    from transformers.models.auto import modeling_auto

    return frozenset(getattr(modeling_auto, AUTO_TABLES[task]))


def attn_implementation(config) -> str:
    """The attention kernel a loaded model runs ("eager", "sdpa", "flash_attention_2", ...). Private:
    PretrainedConfig._attn_implementation, which from_config / from_pretrained resolve and set."""
    return config._attn_implementation

