"""BYOL: the loss against a float64 one-image-at-a-time reference, the momentum schedule's endpoints,
the target network (an exact frozen copy outside the optimizer, moved only by the moving average,
never by a skipped non-finite step), eval-mode losses that are per image, config composition, and
real CLI runs: the defaults train and export the online encoder, two processes keep one target, and
a run killed with SIGKILL resumes to the uninterrupted run's losses and weights, target included.

Each test names the breaking change it catches."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import config_error, kill_9_after_train_records, read_metrics
from test_images import IMAGE_TINY
from test_multiprocess import child_env, free_port, launcher, run_group

from ssltrain.config import validate_config
from ssltrain.objectives import build_objective
from ssltrain.objectives.byol import BYOL, byol_loss, target_momentum


def naive_byol(p_a: torch.Tensor, p_b: torch.Tensor, t_a: torch.Tensor, t_b: torch.Tensor) -> float:
    """The paper's definition, one image and one direction at a time in float64: the squared distance
    between the l2-normalised prediction of one view and the l2-normalised target projection of the
    other, summed over both directions and all images."""
    total = 0.0
    for i in range(len(p_a)):
        for p, t in ((p_a[i], t_b[i]), (p_b[i], t_a[i])):
            p, t = p.double().tolist(), t.double().tolist()
            p_norm, t_norm = math.sqrt(sum(x * x for x in p)), math.sqrt(sum(x * x for x in t))
            total += sum((x / p_norm - y / t_norm) ** 2 for x, y in zip(p, t))
    return total


@pytest.mark.parametrize("n,dim", [(1, 3), (5, 8), (9, 4)])
def test_byol_loss_equals_the_per_image_definition(n, dim):
    """Catches a wrong pairing (a view's prediction scored against its own target instead of the other
    view's), a missing symmetric term, a lost normalisation or a mean where the sum is returned."""
    g = torch.Generator().manual_seed(n)
    p_a, p_b, t_a, t_b = (torch.randn(n, dim, generator=g) for _ in range(4))
    loss_sum, count = byol_loss(p_a, p_b, t_a, t_b)
    assert count.item() == n and loss_sum.dtype == torch.float32
    assert loss_sum.item() == pytest.approx(naive_byol(p_a, p_b, t_a, t_b), rel=1e-5)
    # perfect predictions (any length) score 0; opposite ones the maximum, 4 per direction
    assert byol_loss(3 * t_b, 0.5 * t_a, t_a, t_b)[0].item() == pytest.approx(0.0, abs=1e-5)
    assert byol_loss(-t_b, -t_a, t_a, t_b)[0].item() == pytest.approx(8.0 * n, rel=1e-6)


def test_the_loss_sends_no_gradient_into_the_target_projections():
    """Catches a lost stop-gradient (paper: sg(z')): the target side must be a constant of the loss."""
    g = torch.Generator().manual_seed(0)
    p_a, p_b, t_a, t_b = (torch.randn(4, 5, generator=g, requires_grad=True) for _ in range(4))
    loss_sum, _ = byol_loss(p_a, p_b, t_a, t_b)
    loss_sum.backward()
    assert p_a.grad is not None and p_b.grad is not None
    assert t_a.grad is None and t_b.grad is None


def test_momentum_schedule_runs_from_tau_base_to_one_on_a_cosine():
    """Catches a schedule with the wrong endpoints or direction (paper Sec. 3.2: tau_base at k = 0,
    1 at k = K), and an off-by-one in which k the hook uses after step `step` (k = step + 1)."""
    assert target_momentum(0, 100, 0.996) == pytest.approx(0.996, abs=1e-15)
    assert target_momentum(100, 100, 0.996) == 1.0
    assert target_momentum(50, 100, 0.996) == pytest.approx(0.998, abs=1e-15)
    taus = [target_momentum(k, 100, 0.99) for k in range(101)]
    assert all(a < b for a, b in zip(taus, taus[1:]))
    byol = SimpleNamespace(tau_base=0.9)  # BYOL.momentum reads tau_base only
    assert BYOL.momentum(byol, 0, 10) == pytest.approx(1 - 0.1 * (math.cos(math.pi / 10) + 1) / 2, abs=1e-15)
    assert BYOL.momentum(byol, 9, 10) == 1.0  # the last step leaves the target where it is


# ------------------------------------------------------------------ the target network

def _online(objective: BYOL) -> dict[str, torch.Tensor]:
    return {**{f"encoder.{k}": v for k, v in objective.encoder.state_dict().items()},
            **{f"projector.{k}": v for k, v in objective.projector.state_dict().items()}}


def _target(objective: BYOL) -> dict[str, torch.Tensor]:
    return {k.removeprefix("target."): v for k, v in objective.state_dict().items() if k.startswith("target.")}


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("model", ["resnet-tiny", "vit-tiny"])
def test_the_target_starts_as_an_exact_frozen_copy_outside_the_optimizer(compose, model):
    """Catches a target initialised on its own (paper: a copy of the online weights), one the optimizer
    trains (requires_grad, or listed in param_groups, where AdamW's weight decay would move it), a
    target missing from the state_dict (checkpoints would not hold it), and gradients that do not reach
    every part of the online network (encoder, projector, predictor)."""
    from ssltrain.optim import build_optimizer

    cfg = compose(["objective=byol", f"model={model}"])
    objective = build_objective(cfg, None)
    online, target = _online(objective), _target(objective)
    assert set(online) == set(target) and all(torch.equal(online[k], target[k]) for k in online)
    assert all(online[k].data_ptr() != target[k].data_ptr() for k in online), "the target must own its weights"
    assert not any(p.requires_grad for p in objective.target.parameters())
    grouped = {id(p) for group in objective.param_groups() for p in group["params"]}
    optimized = {id(p) for group in build_optimizer(objective, cfg.optimizer).param_groups for p in group["params"]}
    assert not grouped & {id(p) for p in objective.target.parameters()}
    assert not optimized & {id(p) for p in objective.target.parameters()}

    out = objective({"views": torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(0))})
    assert set(out.metrics) == {"loss"} and out.num_tokens.item() == 12
    loss_sum, count = out.metrics["loss"]
    assert count.item() == 6 and out.loss.item() == pytest.approx(loss_sum.item() / 6)
    assert 0.0 <= out.loss.item() <= 8.0
    out.loss.backward()
    assert all(p.grad is None for p in objective.target.parameters())
    trainable = [(n, p) for n, p in objective.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for _, p in trainable), [n for n, p in trainable if p.grad is None]
    assert {n.split(".")[0] for n, _ in trainable} == {"encoder", "projector", "predictor"}


def test_after_step_moves_the_target_by_exactly_the_moving_average(compose):
    """Catches a wrong update (tau and 1 - tau swapped, the online weights moved instead, a schedule
    step other than k = step + 1), a target that leaves some parameters out, and batch-norm statistics
    overwritten by the update (they are each network's own)."""
    objective = build_objective(compose(["objective=byol", "objective.tau_base=0.9"]), None)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in [*objective.encoder.parameters(), *objective.projector.parameters()]:
            p.add_(0.1 * torch.randn(p.shape, generator=g))  # online weights away from the target
    before_target = {k: v.clone() for k, v in _target(objective).items()}
    before_online = {k: v.clone() for k, v in _online(objective).items()}
    objective.after_step(3, 10)
    tau = 1 - (1 - 0.9) * (math.cos(math.pi * 4 / 10) + 1) / 2  # k = 4 steps done after step 3
    params = {f"encoder.{n}" for n, _ in objective.encoder.named_parameters()} | {
        f"projector.{n}" for n, _ in objective.projector.named_parameters()}
    after = _target(objective)
    for name, value in after.items():
        if name in params:
            expected = tau * before_target[name].double() + (1 - tau) * before_online[name].double()
            torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7, msg=name)
        else:  # buffers: batch-norm running statistics
            assert torch.equal(value, before_target[name]), name
    assert all(torch.equal(v, before_online[k]) for k, v in _online(objective).items()), "online must not move"


def test_a_non_finite_step_leaves_the_target_alone_and_the_next_one_moves_it(compose, monkeypatch):
    """Through the loop's TrainStep: a step whose loss is NaN is skipped, and after_step is not called, so
    neither online nor target weights move; the next, finite step updates the online weights with AdamW
    and then the target by the moving average of step 0. Catches after_step called for a skipped step
    (the target would drift towards unchanged online weights and a resumed run would disagree) or before
    the optimizer step, and a target that the optimizer moves."""
    from ssltrain.train import TrainStep, build_training

    cfg = compose(["objective=byol", *IMAGE_TINY, "trainer.max_steps=4", "objective.tau_base=0.9"])
    training = build_training(cfg)
    objective = training.accelerator.unwrap_model(training.objective)
    views = torch.rand(2 * 32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    run_step = TrainStep(training, iter([{"views": views}] * 2), max_steps=4, grad_clip=cfg.optimizer.grad_clip)

    calls = []
    real_after_step = objective.after_step
    monkeypatch.setattr(objective, "after_step", lambda step, k: (calls.append((step, k)), real_after_step(step, k)))
    real_forward = objective.forward

    def poisoned(batch):
        out = real_forward(batch)
        out.loss = out.loss * torch.tensor(math.nan)
        return out

    online0, target0 = _params(objective.encoder), _params(objective.target)
    monkeypatch.setattr(objective, "forward", poisoned)
    assert not run_step(0).finite
    assert calls == []
    assert all(torch.equal(p, online0[n]) for n, p in _params(objective.encoder).items())
    assert all(torch.equal(p, target0[n]) for n, p in _params(objective.target).items())

    monkeypatch.setattr(objective, "forward", real_forward)
    assert run_step(0).finite
    assert calls == [(0, 4)]
    online1 = _params(objective.encoder)
    assert any(not torch.equal(p, online0[n]) for n, p in online1.items()), "AdamW must have moved the encoder"
    tau = 1 - (1 - 0.9) * (math.cos(math.pi * 1 / 4) + 1) / 2
    for name, value in _params(objective.target.encoder).items():
        expected = tau * target0[f"encoder.{name}"].double() + (1 - tau) * online1[name].double()
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7, msg=name)


def test_eval_mode_losses_are_per_image_so_metrics_per_example_holds(compose):
    """metrics_per_example = True lets a held-out evaluation end with a smaller batch. In eval mode every
    batch norm uses running statistics, so the loss of two half batches adds up to the whole batch's.
    Catches a change that couples the images of a batch at evaluation (in-batch negatives, batch
    statistics in eval mode) without setting the flag to False."""
    objective = build_objective(compose(["objective=byol"]), None).eval()
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(8, 1, 8, 8, generator=g), torch.rand(8, 1, 8, 8, generator=g)

    def loss_sum(first, second, mode_train=False):
        objective.train(mode_train)
        with torch.no_grad():
            return objective({"views": torch.cat([first, second])}).metrics["loss"][0].item()

    whole = loss_sum(a, b)
    assert whole == pytest.approx(loss_sum(a[:3], b[:3]) + loss_sum(a[3:], b[3:]), rel=1e-5)
    # in training mode batch norm uses the batch's statistics: the same split gives another sum
    assert loss_sum(a, b, True) != pytest.approx(loss_sum(a[:3], b[:3], True) + loss_sum(a[3:], b[3:], True),
                                                 rel=1e-4)
    assert BYOL.metrics_per_example


# ------------------------------------------------------------------ config

def test_byol_defaults_to_resnet_on_digits_and_validates(compose):
    """Catches a YAML whose defaults do not pick an image model and data, or whose keys the class refuses."""
    cfg = compose(["objective=byol"])
    assert (cfg.model.name, cfg.data.source, cfg.objective.tau_base) == ("resnet-tiny", "digits", 0.996)
    validate_config(cfg)
    validate_config(compose(["objective=byol", "model=vit-tiny"]))
    assert compose(["model=vit-tiny", "objective=byol"]).model.name == "vit-tiny"


@pytest.mark.parametrize("overrides,needle", [
    (["objective.tau_base=1.5"], "objective.tau_base=1.5"),
    (["objective.projection_dim=0"], "objective.projection_dim=0"),
    (["objective.augment.flip_prob=2"], "objective.augment.flip_prob=2"),
    (["data=docs"], "objective=byol trains on image"),
])
def test_bad_byol_settings_fail_with_one_line(compose, overrides, needle):
    message = config_error(compose, ["objective=byol", *overrides])
    assert needle in message, message


# ------------------------------------------------------------------ end to end

RUN = [a for a in IMAGE_TINY if not a.startswith(("trainer.max_steps", "trainer.log_every", "trainer.eval_batches"))]


@pytest.mark.slow
def test_the_default_byol_run_trains_and_exports_the_online_encoder(run_cli, tmp_path):
    """`ssltrain objective=byol` with its defaults (resnet-tiny, digits) validates, trains, checkpoints and
    exports. Catches an export of the target (or of anything but the online encoder) and a loss that
    does not move."""
    from transformers import AutoModel

    from ssltrain.checkpoint import load_weights

    run = tmp_path / "run"
    result = run_cli("objective=byol", *RUN, "trainer.max_steps=6", "trainer.log_every=2", "trainer.eval_batches=2",
                     "trainer.checkpoint_every=6", f"hydra.run.dir={run}", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(run)
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 3 and all(0 <= x <= 8 for x in losses) and len(set(losses)) == 3
    encoder = AutoModel.from_pretrained(run / "final")
    assert type(encoder).__name__ == "ResNetModel"
    weights = load_weights(run / "checkpoints" / "step-00000006" / "model.safetensors")
    exported = encoder.state_dict()
    assert all(torch.equal(t, weights[f"encoder.{k}"]) for k, t in exported.items())
    assert any(not torch.equal(t, weights[f"target.encoder.{k}"]) for k, t in exported.items())


@pytest.mark.slow
def test_a_killed_byol_run_resumes_to_the_uninterrupted_losses_and_target(run_cli, cache_dir, tmp_path):
    """SIGKILL after a few steps, then the same command: the resumed steps' losses equal an uninterrupted
    run's bit for bit, and so do the final online and target weights. Catches target weights (or the
    EMA schedule's position) that a checkpoint does not restore: a resumed target re-copied from the
    online network, or moved by a different tau, changes every later loss."""
    from ssltrain.checkpoint import load_weights

    run = ["objective=byol", *RUN, "trainer.max_steps=8", "trainer.log_every=1", "trainer.eval_batches=2",
           "trainer.checkpoint_every=2", "trainer.keep_checkpoints=10", "trainer.export=false",
           "objective.tau_base=0.9"]  # a fast-moving target: the EMA state weighs in every loss
    reference = run_cli(*run, f"hydra.run.dir={tmp_path / 'ref'}")
    assert reference.returncode == 0, reference.stderr[-3000:]

    killed = tmp_path / "killed"
    kill_9_after_train_records(run, killed, 3, cwd=tmp_path, cache_dir=cache_dir)
    resumed = run_cli(*run, f"hydra.run.dir={killed}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = read_metrics(killed)
    resume_at = max(i for i, r in enumerate(records) if r["kind"] == "resume")
    assert 2 <= records[resume_at]["step"] < 8
    after = {r["step"]: r["loss"] for r in records[resume_at:] if r["kind"] == "train"}
    expected = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "ref") if r["kind"] == "train"}
    assert sorted(after) == list(range(records[resume_at]["step"] + 1, 9))
    assert all(after[s] == expected[s] for s in after), (after, expected)

    final_ref = load_weights(tmp_path / "ref" / "checkpoints" / "step-00000008" / "model.safetensors")
    final_res = load_weights(killed / "checkpoints" / "step-00000008" / "model.safetensors")
    assert set(final_ref) == set(final_res) and any(k.startswith("target.encoder.") for k in final_ref)
    assert all(torch.equal(final_ref[k], final_res[k]) for k in final_ref)


@pytest.mark.slow
def test_byol_trains_across_two_cpu_processes_with_one_target(cache_dir, tmp_path):
    """torchrun, 2 gloo processes: DDP with a frozen (gradient-free) target does not hang, and every rank
    ends with the same weights, target included (param_checksums cover every parameter). Catches a target
    update that differs between ranks."""
    run = tmp_path / "run"
    argv = [*launcher("torchrun", free_port()), "-m", "ssltrain", "objective=byol", *RUN, "trainer.max_steps=4",
            "trainer.micro_batch_size=16", "trainer.log_every=2", "trainer.eval_batches=1", "trainer.export=false",
            f"hydra.run.dir={run}"]
    result = run_group(argv, tmp_path, child_env(tmp_path, cache_dir, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    end = next(r for r in read_metrics(run) if r["kind"] == "end")
    assert end["world_size"] == 2 and len(set(end["param_checksums"])) == 1
