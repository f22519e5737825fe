"""Tokenizers: train a WordPiece (BERT-style) or byte-level BPE (GPT-2-style) vocabulary on the
corpus with HF `tokenizers`, cache it, and wrap it as a PreTrainedTokenizerFast that saves and
loads like any HF tokenizer. A local path (or a hub name, with network) is used as given.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from ssltrain.data.cache import cached_dir, fingerprint
from ssltrain.errors import ConfigError
from ssltrain.hub import check_folder
from ssltrain.hub import load_tokenizer as load_pretrained_tokenizer

TOKENIZER_VERSION = 1  # bump when training settings below change
WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BPE_EOS, BPE_PAD = "<|endoftext|>", "<|pad|>"


def _train_wordpiece(texts, vocab_size: int, lowercase: bool):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, lowercase=lowercase, strip_accents=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=WORDPIECE_SPECIALS))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    specials = dict(unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                    mask_token="[MASK]")
    return tok, specials


def _train_bpe(texts, vocab_size: int, lowercase: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BPE_EOS, BPE_PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    ))
    specials = dict(bos_token=BPE_EOS, eos_token=BPE_EOS, unk_token=BPE_EOS, pad_token=BPE_PAD)
    return tok, specials


TRAINERS = {"wordpiece": _train_wordpiece, "bpe": _train_bpe}


def train_tokenizer(texts, kind: str, vocab_size: int, lowercase: bool = False):
    """A PreTrainedTokenizerFast trained on an iterable of strings."""
    from transformers import PreTrainedTokenizerFast

    tok, specials = TRAINERS[kind](texts, vocab_size, lowercase)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def save_tokenizer(tokenizer, path: str) -> None:
    """save_pretrained, naming the class PreTrainedTokenizerFast, which transformers 4.x and 5.x
    both load (5.x alone writes its internal "TokenizersBackend")."""
    import json

    tokenizer.save_pretrained(str(path))
    config_path = Path(path, "tokenizer_config.json")
    config = json.loads(config_path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2) + "\n")


def load_tokenizer(path: str, what: str = "tokenizer.path"):
    """The tokenizer saved at `path` (what: the setting that names it, for errors)."""
    try:
        return load_pretrained_tokenizer(os.path.expanduser(path), what)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{what}={path!r} cannot be loaded: {str(err).strip().splitlines()[0]}") from None


def build_tokenizer(cfg: DictConfig, corpus, corpus_key: str):
    """The tokenizer for this run: tokenizer.path, the pretrained model's own, or one trained on
    the training split and cached under cache_dir/tokenizers/<hash>."""
    tok_cfg = cfg.tokenizer
    if cfg.model.pretrained:
        # The model folder is refused here, before any tokenisation, rather than when the model loads.
        check_folder(cfg.model.pretrained, "model.pretrained")
    if tok_cfg.path:
        return load_tokenizer(tok_cfg.path)
    if cfg.model.pretrained and Path(os.path.expanduser(cfg.model.pretrained), "tokenizer_config.json").is_file():
        return load_tokenizer(cfg.model.pretrained, "model.pretrained")
    key = fingerprint(TOKENIZER_VERSION, corpus_key, tok_cfg.type, tok_cfg.vocab_size, tok_cfg.lowercase)

    def build(tmp: Path) -> None:
        texts = corpus["train"]["text"]
        save_tokenizer(train_tokenizer(texts, tok_cfg.type, tok_cfg.vocab_size, tok_cfg.lowercase), str(tmp))

    return load_tokenizer(str(cached_dir(Path(cfg.cache_dir) / "tokenizers", f"{tok_cfg.type}-{key}", build)))
