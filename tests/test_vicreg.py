"""VICReg: each term against a float64 reference written with explicit loops over samples and
dimensions (the covariance with a double loop over dimension pairs, no torch.cov), the terms'
known values, the multi-process maths (two gloo processes with gathered embeddings get the
single-process loss and gradient), the objective's metrics and gradients, config composition, and
real CLI runs of the defaults on one and two processes.

Each test names the breaking change it catches."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import config_error, read_metrics, spawn_gloo
from test_images import IMAGE_TINY
from test_multiprocess import child_env, free_port, launcher, run_group

from ssltrain.config import validate_config
from ssltrain.objectives import build_objective
from ssltrain.objectives.vicreg import VICReg, vicreg_terms


def naive_terms(z_a: torch.Tensor, z_b: torch.Tensor, gamma: float, eps: float) -> tuple[float, float, float]:
    """The paper's definitions (Bardes et al. 2022, Eq. 1, 3-6) one number at a time in float64:
    invariance = sum_i sum_j (a_ij - b_ij)^2 / (n d) (the paper's code's mean squared error),
    variance = sum over both branches of (1/d) sum_j max(0, gamma - sqrt(Var(z_.j) + eps)),
    covariance = sum over both branches of (1/d) sum_{j != k} C_jk^2,
    with C_jk = sum_i (z_ij - m_j)(z_ik - m_k) / (n - 1) and m the column means."""
    a, b = z_a.double().tolist(), z_b.double().tolist()
    n, d = len(a), len(a[0])
    invariance = sum((a[i][j] - b[i][j]) ** 2 for i in range(n) for j in range(d)) / (n * d)
    variance = covariance = 0.0
    for z in (a, b):
        means = [sum(z[i][j] for i in range(n)) / n for j in range(d)]
        for j in range(d):
            var = sum((z[i][j] - means[j]) ** 2 for i in range(n)) / (n - 1)
            variance += max(0.0, gamma - math.sqrt(var + eps)) / d
        for j in range(d):
            for k in range(d):
                if j != k:
                    c = sum((z[i][j] - means[j]) * (z[i][k] - means[k]) for i in range(n)) / (n - 1)
                    covariance += c * c / d
    return invariance, variance, covariance


@pytest.mark.parametrize("n,dim,scale,gamma", [(2, 3, 1.0, 1.0), (6, 5, 0.3, 1.0), (9, 4, 2.0, 0.5)])
def test_vicreg_terms_equal_the_loop_definitions(n, dim, scale, gamma):
    """Catches a biased variance (N instead of N - 1), a square root or hinge in the wrong place, a
    covariance that keeps the diagonal, forgets the centring or the 1/D, and a term computed on one
    branch only. scale 0.3 puts every dimension under the hinge, 2.0 most above it."""
    g = torch.Generator().manual_seed(n)
    z_a = scale * torch.randn(n, dim, generator=g)
    z_b = z_a + 0.5 * torch.randn(n, dim, generator=g)
    z_b[:, 0] = 3.0 * z_a[:, 1]  # a strong cross-dimension correlation
    terms = vicreg_terms(z_a, z_b, gamma, 1e-4)
    reference = naive_terms(z_a, z_b, gamma, 1e-4)
    for name, value, expected in zip(("invariance", "variance", "covariance"), terms, reference):
        assert value.dtype == torch.float32 and value.dim() == 0, name
        assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-7), name


def test_known_values_identical_views_collapse_and_whitened_embeddings():
    """Catches a sign or offset error in each term: identical views have no invariance cost; collapsed
    embeddings (every row equal) pay gamma - sqrt(eps) per dimension and branch and have no covariance;
    decorrelated embeddings with standard deviation above gamma pay nothing for variance and covariance."""
    same = torch.ones(8, 4)
    invariance, variance, covariance = vicreg_terms(same, same.clone())
    assert invariance.item() == 0.0 and covariance.item() == 0.0
    assert variance.item() == pytest.approx(2 * (1.0 - math.sqrt(1e-4)), rel=1e-6)
    # rows of +-2 on a Hadamard pattern: columns orthogonal, zero mean, std 2 * sqrt(8 / 7) > 1
    hadamard = torch.tensor([[1.0]])
    while hadamard.shape[0] < 8:
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)])
    z = 2.0 * hadamard[:, 1:5]
    invariance, variance, covariance = vicreg_terms(z, z.clone())
    assert (invariance.item(), variance.item()) == (0.0, 0.0)
    assert covariance.item() == pytest.approx(0.0, abs=1e-10)


def test_the_terms_run_in_float32_under_autocast():
    """Catches the covariance computed by a low-precision matmul under bf16 autocast: the loss must be
    float32 and equal to the float32 value without autocast."""
    g = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    plain = vicreg_terms(z_a, z_b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = vicreg_terms(z_a.bfloat16(), z_b.bfloat16())
    assert all(m.dtype == torch.float32 for m in mixed)
    exact = vicreg_terms(z_a.bfloat16().float(), z_b.bfloat16().float())
    assert all(torch.equal(m, e) for m, e in zip(mixed, exact))
    assert all(m.item() == pytest.approx(p.item(), rel=0.05) for m, p in zip(mixed, plain))


# ------------------------------------------------------------------ several processes

def _loss(terms) -> torch.Tensor:
    invariance, variance, covariance = terms
    return 25.0 * invariance + 25.0 * variance + 1.0 * covariance


def _rank_step(rank: int, world: int, port: int, x_a, x_b, weight, out_dir: str) -> None:
    """One process of a data-parallel VICReg step as VICReg.forward does it: embed its share of the
    batch, gather with gradients, the loss of the gathered batch, backward, then average gradients as DDP."""
    import torch.distributed as dist

    from ssltrain.objectives.contrastive import gather_with_grad

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        n = x_a.shape[0] // world
        w = weight.clone().requires_grad_(True)
        mine = slice(rank * n, (rank + 1) * n)
        z_a, _ = gather_with_grad(x_a[mine] @ w)
        z_b, _ = gather_with_grad(x_b[mine] @ w)
        loss = _loss(vicreg_terms(z_a, z_b))
        loss.backward()
        grad = w.grad.clone()
        dist.all_reduce(grad)
        torch.save({"grad": grad / world, "loss": loss.detach()}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_get_the_global_batch_loss_and_gradient(tmp_path):
    """Catches variance and covariance taken over one process's rows (a different loss on each rank),
    and a gradient off by the number of processes (each rank backpropagates the same global loss; the
    gather's backward sums those copies and DDP's averaging must bring it back to one)."""
    g = torch.Generator().manual_seed(0)
    world, n, dim = 2, 4, 6
    x_a, x_b = torch.randn(world * n, dim, generator=g), torch.randn(world * n, dim, generator=g)
    weight = torch.randn(dim, 5, generator=g)
    spawn_gloo(_rank_step, (world, free_port(), x_a, x_b, weight, str(tmp_path)), nprocs=world)
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(world)]

    w = weight.clone().requires_grad_(True)
    loss = _loss(vicreg_terms(x_a @ w, x_b @ w))
    loss.backward()
    per_rank = [_loss(vicreg_terms(x_a[r * n:(r + 1) * n] @ weight, x_b[r * n:(r + 1) * n] @ weight)).item()
                for r in range(world)]
    assert all(abs(p - loss.item()) > 1e-3 for p in per_rank), "the test batch must tell local from global"
    for r in results:
        assert r["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
        assert torch.allclose(r["grad"], w.grad, rtol=1e-4, atol=1e-6), "gradient must be the global batch's"


# ------------------------------------------------------------------ objective and config

@pytest.mark.parametrize("model", ["resnet-tiny", "vit-tiny"])
def test_forward_reports_the_weighted_terms_and_gradients_reach_encoder_and_expander(compose, model):
    """Catches a loss that is not lambda * s + mu * v + nu * c of the reported terms, a metric count other
    than the images of the batch, and an expander or encoder that gets no gradient."""
    objective = build_objective(compose(["objective=vicreg", f"model={model}", "objective.variance_coeff=10",
                                         "objective.expander_dim=32"]), None)
    assert objective.expander[0].out_features == 32 and objective.expander[-1].out_features == 32
    views = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = objective({"views": views})
    assert set(out.metrics) == {"loss", "invariance", "variance", "covariance"} and out.num_tokens.item() == 12
    means = {k: (s / c).item() for k, (s, c) in out.metrics.items()}
    assert all(c.item() == 6 for _, c in out.metrics.values())
    assert means["loss"] == pytest.approx(out.loss.item(), rel=1e-6)
    expected = 25 * means["invariance"] + 10 * means["variance"] + means["covariance"]
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    out.loss.backward()
    trainable = [(n, p) for n, p in objective.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for _, p in trainable), [n for n, p in trainable if p.grad is None]
    assert {n.split(".")[0] for n, _ in trainable} == {"encoder", "expander"}
    assert not VICReg.metrics_per_example  # batch statistics: held-out evaluation keeps full batches


def test_vicreg_defaults_to_resnet_on_digits_and_validates(compose):
    """Catches a YAML whose defaults do not pick an image model and data, or whose keys the class refuses."""
    cfg = compose(["objective=vicreg"])
    assert (cfg.model.name, cfg.data.source) == ("resnet-tiny", "digits")
    assert (cfg.objective.invariance_coeff, cfg.objective.variance_coeff, cfg.objective.covariance_coeff) == (25, 25, 1)
    validate_config(cfg)
    validate_config(compose(["objective=vicreg", "model=vit-tiny"]))


@pytest.mark.parametrize("overrides,needle", [
    (["objective.gamma=0"], "objective.gamma=0"),
    (["objective.variance_coeff=-1"], "objective.variance_coeff=-1"),
    (["objective.expander_dim=0"], "objective.expander_dim=0"),
    (["+objective.lambda=3"], "objective.lambda is not a parameter of VICReg"),
    (["data=docs"], "objective=vicreg trains on image"),
])
def test_bad_vicreg_settings_fail_with_one_line(compose, overrides, needle):
    message = config_error(compose, ["objective=vicreg", *overrides])
    assert needle in message, message


# ------------------------------------------------------------------ end to end

RUN = [a for a in IMAGE_TINY if not a.startswith(("trainer.max_steps", "trainer.log_every", "trainer.eval_batches"))]


@pytest.mark.slow
def test_the_default_vicreg_run_trains_and_its_loss_falls(run_cli, tmp_path):
    """`ssltrain objective=vicreg` with its defaults (resnet-tiny, digits) validates, trains and exports an
    encoder that reloads with AutoModel; the terms are logged. Catches a default that does not run or
    does not learn (the held-out loss must fall within 20 steps)."""
    from transformers import AutoModel

    run = tmp_path / "run"
    result = run_cli("objective=vicreg", *RUN, "trainer.max_steps=20", "trainer.log_every=10",
                     "trainer.eval_batches=2", f"hydra.run.dir={run}", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(run)
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 2 and all({"invariance", "variance", "covariance"} <= set(r) for r in train)
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 20
    assert evals[-1]["loss"] < evals[0]["loss"], "held-out VICReg loss must fall"
    assert type(AutoModel.from_pretrained(run / "final")).__name__ == "ResNetModel"


@pytest.mark.slow
def test_vicreg_trains_across_two_cpu_processes(cache_dir, tmp_path):
    """torchrun, 2 gloo processes: the gathers interleave with DDP's collectives without hanging, ranks see
    different images and end with the same weights."""
    run = tmp_path / "run"
    argv = [*launcher("torchrun", free_port()), "-m", "ssltrain", "objective=vicreg", *RUN, "trainer.max_steps=4",
            "trainer.micro_batch_size=16", "trainer.log_every=2", "trainer.eval_batches=1", "trainer.export=false",
            f"hydra.run.dir={run}"]
    result = run_group(argv, tmp_path, child_env(tmp_path, cache_dir, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(run)
    start = next(r for r in records if r["kind"] == "start")
    assert start["world_size"] == 2 and not set(start["rank_first_examples"][0]) & set(start["rank_first_examples"][1])
    end = next(r for r in records if r["kind"] == "end")
    assert len(set(end["param_checksums"])) == 1
    assert all(math.isfinite(r["loss"]) for r in records if r["kind"] == "train")
