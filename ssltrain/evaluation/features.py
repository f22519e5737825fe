"""Frozen features from an exported encoder (a run's final/ or any HF checkpoint folder), for
probes: the pretrained weights or a fresh random init of the same config.

Images: the pooled representation the image objectives train (ImageObjective.represent: a CNN's
global average pool, a ViT's mean over its final token states), i.e. the encoder output before
any projection head, which the exports do not contain. Text: the mean of the last hidden states
over non-padding tokens (pooling="mean", the default: it works for encoders, decoders and T5's
encoder alike, and an MLM-only model never trains its [CLS]), the first token's state
(pooling="cls"), or the token mean of every layer's states averaged, the embedding layer's
included (pooling="layers-mean": the lexical lower layers with the contextual top, as ELMo's
layer mix and the "first-last average" of sentence-embedding work; the last layer of a small,
briefly trained MLM is specialised to predicting tokens and carries less of the passage).
"""

from __future__ import annotations

import contextlib
import types
from pathlib import Path

import numpy as np
import torch

from ssltrain.errors import UserError
from ssltrain.hub import load_config, load_model
from ssltrain.objectives.image import ImageObjective

INITS = ("pretrained", "random-init")
TEXT_POOLINGS = ("mean", "cls", "layers-mean")


def load_encoder(model_dir: str | Path, init: str = "pretrained", seed: int = 0):
    """The encoder at model_dir as AutoModel (T5-style encoder-decoders: their encoder), in eval mode.

    init="random-init": the same config with fresh weights drawn under torch seed `seed`.
    Raises UserError when the folder has no model, or when loading would silently leave
    weights other than the unused pooler at random (a key-name mismatch).
    """
    from transformers import AutoModel

    model_dir = Path(model_dir).expanduser()
    if init not in INITS:
        raise UserError(f"init={init!r} is not one of {', '.join(INITS)}")
    try:
        config = load_config(model_dir)
    except (OSError, ValueError) as err:
        raise UserError(f"{model_dir} holds no readable model config: {_first_line(err)}") from None
    if init == "random-init":
        with _seeded(seed):
            model = AutoModel.from_config(config)
    else:
        try:
            model, info = load_model(AutoModel, model_dir, output_loading_info=True)
        except (OSError, ValueError) as err:
            raise UserError(f"{model_dir} cannot be loaded with AutoModel: {_first_line(err)}") from None
        missing = [k for k in info.get("missing_keys", []) if not k.split(".")[0] == "pooler"]
        if missing:
            raise UserError(f"{model_dir}: {len(missing)} encoder weights are missing from the checkpoint "
                            f"(e.g. {', '.join(sorted(missing)[:3])}); its features would be partly random")
    if getattr(model.config, "is_encoder_decoder", False):
        model = model.get_encoder()
    return model.eval()


@contextlib.contextmanager
def _seeded(seed: int):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


@torch.no_grad()
def image_features(encoder, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """(N, C, H, W) float32 in [0, 1] -> (N, width) float32, pooled as the image objectives pool."""
    holder = types.SimpleNamespace(encoder=encoder)  # represent() only reads self.encoder
    out = [ImageObjective.represent(holder, torch.as_tensor(pixels[i:i + batch_size], dtype=torch.float32))
           for i in range(0, len(pixels), batch_size)]
    return torch.cat(out).float().numpy()


@torch.no_grad()
def text_features(encoder, tokenizer, texts: list[str], max_length: int = 128, pooling: str = "mean",
                  batch_size: int = 64) -> np.ndarray:
    """Texts -> (N, hidden) float32: last hidden states (or every layer's, averaged: layers-mean), mean
    over non-padding tokens, or the first token's last state (cls)."""
    if pooling not in TEXT_POOLINGS:
        raise UserError(f"pooling={pooling!r} is not one of {', '.join(TEXT_POOLINGS)}")
    if tokenizer.pad_token is None:  # GPT-2-style vocabularies: pad with end-of-text (masked out below)
        tokenizer.pad_token = tokenizer.eos_token
    limit = getattr(encoder.config, "max_position_embeddings", None) or max_length
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                        max_length=min(max_length, limit), return_tensors="pt", return_token_type_ids=False)
        states = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                         output_hidden_states=pooling == "layers-mean")
        hidden = torch.stack(states.hidden_states).mean(0) if pooling == "layers-mean" else states.last_hidden_state
        if pooling == "cls":
            out.append(hidden[:, 0])
        else:
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
    return torch.cat(out).float().numpy()


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
