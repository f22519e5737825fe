"""Rotation prediction: rotations against hand-worked examples, the loss against a direct
cross-entropy, config composition and fits, and real tiny CPU runs (ViT and ResNet) whose
held-out loss falls and whose exported encoder reloads with AutoModel."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import read_metrics
from test_images import IMAGE_TINY, one_thread

from ssltrain.config import validate_config
from ssltrain.errors import ConfigError
from ssltrain.objectives import build_objective
from ssltrain.objectives.rotation import RotationCollator, rotate_batch


def test_rotations_are_counter_clockwise_quarter_turns_with_their_labels():
    image = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None]  # (1, 1, 2, 2)
    rotated, labels = rotate_batch(image)
    expected = [[[1, 2], [3, 4]], [[2, 4], [1, 3]], [[4, 3], [2, 1]], [[3, 1], [4, 2]]]  # 0, 90, 180, 270 degrees
    assert torch.equal(rotated[:, 0], torch.tensor(expected, dtype=torch.float32))
    assert labels.tolist() == [0, 1, 2, 3]


def test_every_image_appears_at_all_four_angles():
    images = torch.rand(3, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    rotated, labels = rotate_batch(images)
    assert rotated.shape == (12, 2, 5, 5) and labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for k in range(4):
        for i in range(3):
            assert torch.equal(rotated[k * 3 + i], torch.rot90(images[i], k, dims=(-2, -1)))
            back = torch.rot90(rotated[k * 3 + i], -k, dims=(-2, -1))
            assert torch.equal(back, images[i])


def test_rotation_defaults_to_resnet_on_digits_and_rejects_text(compose):
    cfg = compose(["objective=rotation"])
    assert (cfg.model.name, cfg.data.source) == ("resnet-tiny", "digits")
    validate_config(cfg)
    validate_config(compose(["objective=rotation", "model=vit-tiny"]))
    for overrides, needle in [(["objective=rotation", "data=docs"], "trains on image but data=docs gives text"),
                              (["objective=rotation", "model=gpt2-tiny"], "needs an image model"),
                              (["objective=rotation", "objective.augment.crop_scale=[0.5,2.0]"], "crop_scale")]:
        with pytest.raises(ConfigError, match=needle) as info:
            validate_config(compose(overrides))
        assert "\n" not in str(info.value)


def test_collator_is_reproducible_and_picklable(compose):
    objective = build_objective(compose(["objective=rotation", "objective.augment.flip_prob=0.5"]), None)
    collator = objective.build_collator()
    assert isinstance(collator, RotationCollator)
    columns = {"pixels": np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32), "label": np.arange(4)}
    batch = collator(columns, torch.Generator().manual_seed(1))
    assert batch["pixels"].shape == (16, 1, 8, 8) and batch["labels"].shape == (16,)
    again = pickle.loads(pickle.dumps(collator))(columns, torch.Generator().manual_seed(1))
    assert torch.equal(again["pixels"], batch["pixels"])
    plain = build_objective(compose(["objective=rotation"]), None).build_collator()  # no augmentation by default
    assert torch.equal(plain(columns, torch.Generator())["pixels"][:4], torch.from_numpy(columns["pixels"]))


@pytest.mark.parametrize("model", ["vit-tiny", "resnet-tiny"])
def test_loss_is_the_cross_entropy_of_the_head_over_all_rotations(compose, model):
    objective = build_objective(compose(["objective=rotation", f"model={model}"]), None).eval()
    pixels, labels = rotate_batch(torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    out = objective({"pixels": pixels, "labels": labels})
    with torch.no_grad():
        logits = objective.head(objective.represent(pixels))
    assert out.loss.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    correct, count = out.metrics["rotation_acc"]
    assert count.item() == 20 and correct.item() == (logits.argmax(1) == labels).sum().item()
    assert out.num_tokens.item() == 20


@pytest.mark.slow
@pytest.mark.parametrize("model,expected_type", [("vit-tiny", "ViTModel"), ("resnet-tiny", "ResNetModel")])
def test_rotation_run_learns_and_the_encoder_reloads_with_automodel(compose, tmp_path, model, expected_type):
    from transformers import AutoModel

    from ssltrain.checkpoint import load_weights
    from ssltrain.train import train

    cfg = compose(["objective=rotation", f"model={model}", *IMAGE_TINY, "trainer.batch_size=16",
                   "trainer.micro_batch_size=16", "trainer.max_steps=50", "optimizer.lr=2e-3",
                   "trainer.checkpoint_every=50"])
    with one_thread():
        result = train(cfg, tmp_path / "run")
    evals = [r for r in read_metrics(result["run_dir"]) if r["kind"] == "eval"]
    assert evals[0]["loss"] == pytest.approx(math.log(4), abs=0.2)  # chance among 4 angles
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.3, evals
    assert evals[-1]["rotation_acc"] > 0.45, evals  # chance: 0.25

    encoder = AutoModel.from_pretrained(result["export"])
    assert type(encoder).__name__ == expected_type
    trained = load_weights(result["run_dir"] / "checkpoints" / "step-00000050" / "model.safetensors")
    for name, tensor in encoder.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(tensor, trained[f"encoder.{name}"]), name
