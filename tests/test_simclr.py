"""SimCLR: NT-Xent against a naive double loop over pairs, the multi-process maths (per-rank
losses over gathered projections = the full-batch loss, and the gradient of two gloo processes
= the single-process gradient), config composition and fits, and a real tiny CPU run whose
held-out loss falls and whose exported encoder reloads with AutoModel."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import config_error, free_port, read_metrics, spawn_gloo
from test_images import IMAGE_TINY, one_thread

from ssltrain.config import validate_config
from ssltrain.objectives import build_objective
from ssltrain.objectives.image import TwoViewCollator
from ssltrain.objectives.simclr import nt_xent_loss


def naive_nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> tuple[float, int, int]:
    """The paper's definition, one pair at a time: l(i, j) = -log exp(s_ij / t) / sum_{k != i} exp(s_ik / t)
    with s the cosine similarity, averaged over both orders of every positive pair."""
    views = [v.double() for v in [*z_a, *z_b]]
    n = len(z_a)
    total, correct = 0.0, 0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        sims = {k: float(torch.dot(views[i], views[k]) / (views[i].norm() * views[k].norm())) / temperature
                for k in range(2 * n) if k != i}
        denominator = sum(math.exp(s) for s in sims.values())
        total += -math.log(math.exp(sims[positive]) / denominator)
        correct += max(sims, key=sims.get) == positive
    return total, 2 * n, correct


@pytest.mark.parametrize("n,dim,temperature", [(2, 3, 0.5), (5, 8, 0.1), (7, 4, 1.0)])
def test_nt_xent_equals_the_pairwise_definition(n, dim, temperature):
    g = torch.Generator().manual_seed(n)
    z_a, z_b = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    z_b[0] = 3 * z_a[0]  # one obvious positive: same direction, other length
    loss_sum, count, correct = nt_xent_loss(z_a, z_b, temperature)
    ref_sum, ref_count, ref_correct = naive_nt_xent(z_a, z_b, temperature)
    assert loss_sum.item() == pytest.approx(ref_sum, rel=1e-5)
    assert (count.item(), correct.item()) == (ref_count, ref_correct)


def test_nt_xent_of_identical_views_is_low_and_of_collapsed_ones_is_log_2n_minus_1():
    z = torch.eye(6)  # orthogonal images, each view equal to its pair
    loss_sum, count, correct = nt_xent_loss(z, z.clone(), 0.1)
    assert loss_sum.item() / count.item() < 1e-3 and correct.item() == 12
    same = torch.ones(6, 4)
    loss_sum, count, _ = nt_xent_loss(same, same, 0.5)
    assert loss_sum.item() / count.item() == pytest.approx(math.log(11), rel=1e-6)


def test_per_rank_losses_over_the_gathered_batch_add_up_to_the_full_batch_loss():
    """What each of P processes computes (its own rows as anchors, everyone's projections as
    candidates) summed over processes == the single-process loss of the concatenated batch."""
    g = torch.Generator().manual_seed(0)
    world, n, dim = 4, 3, 5
    z_a, z_b = torch.randn(world * n, dim, generator=g), torch.randn(world * n, dim, generator=g)
    full = nt_xent_loss(z_a, z_b, 0.2)
    parts = [nt_xent_loss(z_a, z_b, 0.2, torch.arange(r * n, (r + 1) * n)) for r in range(world)]
    for i in range(3):
        assert sum(p[i] for p in parts).item() == pytest.approx(full[i].item(), rel=1e-6)


def _rank_step(rank: int, world: int, port: int, x_a, x_b, weight, temperature: float, out_dir: str) -> None:
    """One process of a data-parallel SimCLR step: project its share of the batch, gather with
    gradients, score its own anchors, backward, then average gradients as DDP does."""
    import torch.distributed as dist

    from ssltrain.objectives.contrastive import gather_with_grad

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        n = x_a.shape[0] // world
        w = weight.clone().requires_grad_(True)
        mine = slice(rank * n, (rank + 1) * n)
        z_a, offset = gather_with_grad(x_a[mine] @ w)
        z_b, _ = gather_with_grad(x_b[mine] @ w)
        loss_sum, count, correct = nt_xent_loss(z_a, z_b, temperature, torch.arange(offset, offset + n))
        (loss_sum / count).backward()
        grad = w.grad.clone()
        dist.all_reduce(grad)
        totals = torch.stack([loss_sum.detach(), count.float(), correct.float()])
        dist.all_reduce(totals)
        torch.save({"grad": grad / world, "totals": totals, "offset": offset}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_get_the_single_process_loss_and_gradient(tmp_path):
    g = torch.Generator().manual_seed(0)
    world, n, dim = 2, 4, 6
    x_a, x_b = torch.randn(world * n, dim, generator=g), torch.randn(world * n, dim, generator=g)
    weight = torch.randn(dim, 3, generator=g)
    spawn_gloo(_rank_step, (world, free_port(), x_a, x_b, weight, 0.3, str(tmp_path)), nprocs=world)
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(world)]
    assert [r["offset"] for r in results] == [0, n]

    w = weight.clone().requires_grad_(True)
    loss_sum, count, correct = nt_xent_loss(x_a @ w, x_b @ w, 0.3)
    (loss_sum / count).backward()
    for r in results:
        assert torch.allclose(r["totals"], torch.stack([loss_sum.detach(), count.float(), correct.float()]),
                              rtol=1e-5)
        assert torch.allclose(r["grad"], w.grad, rtol=1e-4, atol=1e-6), "gradient must be the global batch's"


# ------------------------------------------------------------------ config, collator, objective

def test_simclr_defaults_to_resnet_on_digits_and_the_command_line_wins(compose):
    cfg = compose(["objective=simclr"])
    assert (cfg.model.name, cfg.data.source, cfg.model.config.num_channels) == ("resnet-tiny", "digits", 1)
    validate_config(cfg)
    for overrides in (["objective=simclr", "model=vit-tiny"], ["model=vit-tiny", "objective=simclr"]):
        cfg = compose(overrides)
        assert (cfg.model.name, cfg.model.config.image_size, cfg.model.config.num_channels) == ("vit-tiny", 8, 1)
        validate_config(cfg)
    cifar_like = compose(["objective=simclr", "model=vit-tiny", "data=hf_image_dataset", "data.name=cifar10"])
    assert (cifar_like.model.config.image_size, cifar_like.model.config.num_channels) == (32, 3)
    assert compose([]).model.name == "bert-tiny" and compose([]).data.source == "docs"  # text default unchanged


@pytest.mark.parametrize("overrides,needles", [
    (["objective=simclr", "data=docs"], ["trains on image", "digits, hf_image_dataset, image_folder"]),
    (["objective=mlm", "data=digits"], ["trains on text", "docs"]),
    (["objective=simclr", "model=bert-tiny"], ["needs an image model", "resnet-tiny, vit-tiny"]),
    (["objective=mlm", "model=vit-tiny"], ["needs a text model", "bert-tiny"]),
    (["objective=simclr", "model=vit-tiny", "model.config.image_size=16"], ["takes 16x16", "data.image_size=16"]),
    (["objective=simclr", "data.channels=3", "model.config.num_channels=1"], ["takes 1-channel", "data.channels=1"]),
    (["objective=simclr", "model=vit-tiny", "model.config.patch_size=3"], ["patch_size 3 does not divide"]),
    (["objective=simclr", "objective.augment.flip_prob=2"], ["objective.augment.flip_prob=2"]),
    (["objective=simclr", "objective.temperature=0"], ["objective.temperature=0"]),
])
def test_incompatible_choices_fail_with_one_line_naming_what_fits(compose, overrides, needles):
    message = config_error(compose, overrides)
    assert all(needle in message for needle in needles), message


def test_cli_rejects_simclr_on_text_before_creating_a_run_dir(run_cli, tmp_path):
    result = run_cli("objective=simclr", "data=docs", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssltrain: error: objective=simclr trains on image"), lines
    assert not (tmp_path / "run").exists()


def test_two_views_are_different_augmentations_reproducible_from_the_seed(compose):
    import numpy as np

    objective = build_objective(compose(["objective=simclr"]), None)
    collator = objective.build_collator()
    assert isinstance(collator, TwoViewCollator)
    columns = {"pixels": np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32), "label": np.arange(5)}
    batch = collator(columns, torch.Generator().manual_seed(3))
    views = batch["views"]
    assert views.shape == (10, 1, 8, 8) and 0 <= views.min() and views.max() <= 1
    assert not torch.equal(views[:5], views[5:])
    assert torch.equal(views, collator(columns, torch.Generator().manual_seed(3))["views"])
    import pickle

    assert torch.equal(pickle.loads(pickle.dumps(collator))(columns, torch.Generator().manual_seed(3))["views"], views)


@pytest.mark.parametrize("model", ["vit-tiny", "resnet-tiny"])
def test_forward_gives_loss_metrics_and_gradients_to_encoder_and_head(compose, model):
    objective = build_objective(compose(["objective=simclr", f"model={model}"]), None)
    views = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = objective({"views": views})
    assert set(out.metrics) == {"loss", "contrastive_acc"} and out.num_tokens.item() == 12
    loss_sum, count = out.metrics["loss"]
    assert count.item() == 12 and out.loss.item() == pytest.approx(loss_sum.item() / 12)
    out.loss.backward()
    trainable = [(n, p) for n, p in objective.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for _, p in trainable), [n for n, p in trainable if p.grad is None]
    assert any(n.startswith("encoder.") for n, _ in trainable) and any(n.startswith("projector.") for n, _ in trainable)


# ------------------------------------------------------------------ end to end

@pytest.mark.slow
def test_simclr_run_heldout_loss_falls_and_the_encoder_reloads_with_automodel(compose, tmp_path):
    from transformers import AutoModel

    from ssltrain.checkpoint import load_weights
    from ssltrain.train import train

    cfg = compose(["objective=simclr", "model=vit-tiny", *IMAGE_TINY, "trainer.max_steps=60", "optimizer.lr=2e-3",
                   "trainer.checkpoint_every=60"])
    with one_thread():
        result = train(cfg, tmp_path / "run")
    records = read_metrics(result["run_dir"])
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 60
    assert evals[0]["loss"] == pytest.approx(math.log(2 * 32 - 1), abs=0.1)  # chance: 63 candidates
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.3, "held-out NT-Xent must fall clearly"
    assert evals[-1]["contrastive_acc"] > 2 * evals[0]["contrastive_acc"]
    assert not list(result["export"].glob("tokenizer*"))

    encoder = AutoModel.from_pretrained(result["export"])
    assert type(encoder).__name__ == "ViTModel" and encoder.config.image_size == 8
    trained = load_weights(result["run_dir"] / "checkpoints" / "step-00000060" / "model.safetensors")
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(tensor, trained[f"encoder.{name}"]), name
    with torch.no_grad():
        hidden = encoder(pixel_values=torch.rand(2, 1, 8, 8)).last_hidden_state
    assert hidden.shape == (2, 17, encoder.config.hidden_size)


@pytest.mark.slow
def test_simclr_trains_across_two_cpu_processes(cache_dir, tmp_path):
    """torchrun, 2 gloo processes: the custom gather's collectives interleave with DDP's without
    hanging (ViT: its frozen pooler must not stall DDP), ranks see different images and end with
    the same weights."""
    from test_multiprocess import child_env, launcher, run_group

    run_dir = tmp_path / "run"
    argv = [*launcher("torchrun", free_port()), "-m", "ssltrain", "objective=simclr", "model=vit-tiny", *IMAGE_TINY,
            "trainer.max_steps=6", "trainer.micro_batch_size=16", "trainer.log_every=3", "trainer.export=false",
            f"hydra.run.dir={run_dir}"]
    result = run_group(argv, tmp_path, child_env(tmp_path, cache_dir, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(run_dir)
    start = next(r for r in records if r["kind"] == "start")
    first = start["rank_first_examples"]
    assert start["world_size"] == 2 and not set(first[0]) & set(first[1])
    end = next(r for r in records if r["kind"] == "end")
    assert len(set(end["param_checksums"])) == 1
    assert all(math.isfinite(r["loss"]) for r in records if r["kind"] == "train")


@pytest.mark.slow
def test_resumed_simclr_run_repeats_the_same_losses(compose, tmp_path):
    """Augmented views are a function of (seed, epoch, batch) and batch-norm statistics live in the
    checkpoint, so resuming at step 10 gives the uninterrupted run's losses exactly."""
    import shutil

    from ssltrain.train import train

    cfg = compose(["objective=simclr", *IMAGE_TINY, "trainer.max_steps=20", "trainer.checkpoint_every=10",
                   "trainer.keep_checkpoints=5", "trainer.log_every=5", "trainer.eval_batches=2"])
    with one_thread():
        whole = train(cfg, tmp_path / "whole")
        (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
        shutil.copytree(tmp_path / "whole" / "checkpoints" / "step-00000010",
                        tmp_path / "resumed" / "checkpoints" / "step-00000010")
        resumed = train(cfg, tmp_path / "resumed")

    def losses(run_dir):
        return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train" and r["step"] > 10}

    assert losses(resumed["run_dir"]) == losses(whole["run_dir"]) and len(losses(whole["run_dir"])) == 2
    assert resumed["eval"] == whole["eval"]
