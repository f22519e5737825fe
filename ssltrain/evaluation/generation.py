"""BLEU for sequence-to-sequence outputs (sacrebleu), and the held-out span-corruption test.

`span_corruption_bleu(run)`: held-out documents of the run's data are packed into blocks as in
training, corrupted by the run's own span-corruption collator (seeded, so every model sees the
same inputs), and the exported T5 generates the targets greedily; corpus BLEU (sacrebleu's
defaults: 13a tokenisation, exp smoothing) compares the generated span text with the true one,
sentinels and end-of-sequence removed. `ssltrain-bleu <run>` prints it and appends a
"downstream" record to the run's metrics.jsonl and TensorBoard.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from ssltrain.errors import UserError


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (0-100) of hypotheses against one reference each (sacrebleu defaults)."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, batch_size: int = 32) -> list[list[int]]:
    """(N, L) encoder inputs -> N generated token-id lists (greedy, no sampling)."""
    outputs = []
    for i in range(0, len(input_ids), batch_size):
        batch = input_ids[i:i + batch_size]
        generated = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), do_sample=False,
                                   num_beams=1, max_new_tokens=max_new_tokens)
        outputs.extend(generated.tolist())
    return outputs


def generation_bleu(model, tokenizer, input_ids: torch.Tensor, target_ids: torch.Tensor,
                    batch_size: int = 32) -> dict:
    """Greedy targets for input_ids (N, L) scored against target_ids (N, T) (special tokens removed
    from both). Returns {"bleu", "hypotheses", "references"}."""
    generated = greedy_generate(model, input_ids, max_new_tokens=target_ids.shape[1], batch_size=batch_size)
    hypotheses = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in generated]
    references = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in target_ids.tolist()]
    return {"bleu": bleu(hypotheses, references), "hypotheses": hypotheses, "references": references}


def span_corruption_bleu(path, n_examples: int = 64, seed: int = 0, batch_size: int = 32) -> dict:
    """Greedy held-out span-corruption BLEU of a span_corruption run (directory or its final/).

    Returns {"bleu", "n_examples", "hypotheses", "references"}."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForSeq2SeqLM

    from ssltrain.data.blocks import pack_ids, separator_id  # local: keeps `ssltrain-bleu --help` fast
    from ssltrain.data.corpus import load_corpus  # local: keeps `ssltrain-bleu --help` fast
    from ssltrain.evaluation.tasks import cache_dir_for, locate  # local: keeps `ssltrain-bleu --help` fast
    from ssltrain.hub import load_model, load_tokenizer  # local: keeps `ssltrain-bleu --help` fast
    from ssltrain.objectives.span_corruption import (  # local: keeps `ssltrain-bleu --help` fast
        SpanCorruptionCollator,
        compute_lengths,
        sentinel_tokens,
    )

    location = locate(path)
    cfg = location.run_cfg
    if cfg is None or "noise_density" not in cfg.objective:
        raise UserError(f"{path} is not a span_corruption run directory (its config.yaml names the corruption)")
    obj = cfg.objective
    tokenizer = load_tokenizer(location.model_dir)
    model = load_model(AutoModelForSeq2SeqLM, location.model_dir).eval()
    tokens_length = compute_lengths(cfg.trainer.seq_len, obj.noise_density, obj.mean_noise_span_length)[0]
    corpus, _ = load_corpus(OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=True)), cache_dir_for(cfg))
    docs = tokenizer(list(corpus["validation"]["text"]), add_special_tokens=False)["input_ids"]
    prefix = [tokenizer.cls_token_id] if getattr(tokenizer, "cls_token_id", None) is not None else []
    blocks = pack_ids(docs, tokens_length, separator_id(tokenizer), prefix)[:n_examples]
    if not blocks:
        raise UserError(f"the held-out split of {path} gives no {tokens_length}-token block")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    start = model.config.decoder_start_token_id
    collator = SpanCorruptionCollator(obj.noise_density, obj.mean_noise_span_length,
                                      tuple(tokenizer.convert_tokens_to_ids(sentinel_tokens(obj.num_sentinels))), eos,
                                      tokenizer.pad_token_id if start is None else start)
    batch = collator({"input_ids": np.asarray(blocks)}, torch.Generator().manual_seed(seed))
    result = generation_bleu(model, tokenizer, batch["input_ids"], batch["labels"], batch_size)
    return {**result, "n_examples": len(blocks), "run_dir": location.run_dir}


def record_bleu(run_dir, result: dict) -> None:
    from ssltrain.evaluation.records import append_records, last_step  # local: keeps `ssltrain-bleu --help` fast

    append_records(run_dir, "downstream", [{"task": "span_corruption_heldout", "metric": "bleu",
                                            "bleu": result["bleu"], "n_examples": result["n_examples"]}],
                   [("downstream/span_corruption_bleu", result["bleu"], last_step(run_dir))])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ssltrain-bleu", description="Greedy held-out BLEU of a span_corruption "
                                     "run's export; appends a 'downstream' record to its metrics.jsonl.")
    parser.add_argument("path", help="a span_corruption run directory (or its final/)")
    parser.add_argument("--examples", type=int, default=64, help="held-out blocks to corrupt and restore")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corruption")
    parser.add_argument("--show", type=int, default=3, help="print this many hypothesis/reference pairs")
    parser.add_argument("--no-record", action="store_true", help="do not write to the run's records")
    args = parser.parse_args(argv)
    try:
        result = span_corruption_bleu(args.path, args.examples, args.seed)
    except UserError as err:
        print(f"ssltrain-bleu: error: {err}", file=sys.stderr)
        return 2
    for hyp, ref in list(zip(result["hypotheses"], result["references"]))[:args.show]:
        print(f"  generated: {hyp[:150]!r}\n  true:      {ref[:150]!r}")
    print(f"BLEU {result['bleu']:.2f} on {result['n_examples']} held-out blocks")
    if not args.no_record and result["run_dir"] is not None:
        record_bleu(result["run_dir"], result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
