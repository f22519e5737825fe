"""Fine-tuning (objective=classify) through the one loop: a pretrained export's encoder loads, the
classifier learns the docs topic task and the digits, the export is a plain transformers
classifier, freezing and gradual unfreezing do what they say, label fractions are stratified and
seeded, and head/backbone learning rates reach the optimizer."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from conftest import TINY, config_error, read_metrics

from ssltrain.config import validate_config
from ssltrain.errors import ConfigError
from ssltrain.objectives.classify import Classify, unfrozen_groups

# The docs topic task at CPU-test size: 64-token passages, whole held-out split every evaluation.
TEXT = ["objective=classify", "trainer.seq_len=64", "trainer.batch_size=32", "trainer.micro_batch_size=32",
        "trainer.log_every=25", "trainer.eval_every=0", "trainer.eval_batches=null"]
DIGITS = ["objective=classify", "data=digits", "model=resnet-tiny", "trainer.batch_size=32",
          "trainer.micro_batch_size=32", "trainer.log_every=10", "trainer.eval_every=0", "trainer.eval_batches=null"]
BERT_GROUPS_TOP_DOWN = ["encoder.layer.1", "encoder.layer.0", "embeddings"]  # bert-tiny: 2 layers


def build(cfg):
    """(objective, tokenizer, examples) as train() builds them, without training."""
    from ssltrain.data.corpus import load_corpus
    from ssltrain.data.tokenizer import build_tokenizer
    from ssltrain.objectives import build_objective

    corpus, key = load_corpus(cfg.data, cfg.cache_dir)
    tokenizer = build_tokenizer(cfg, corpus, key) if cfg.data.modality == "text" else None
    if tokenizer is not None:
        tokenizer.model_max_length = cfg.trainer.seq_len
    examples = Classify.build_examples(corpus, tokenizer, cfg, key)
    return build_objective(cfg, tokenizer, examples), tokenizer, examples


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from pydoc_data.topics import topics

    from ssltrain.data.tokenizer import train_tokenizer

    return train_tokenizer(list(topics.values())[:40], "wordpiece", 400)


def bert_classifier(compose, tokenizer, **params):
    cfg = compose(["objective=classify"])
    return Classify(model_cfg=cfg.model, tokenizer=tokenizer, hardware=cfg.hardware,
                    label_names=[f"c{i}" for i in range(8)], **params)


# ---------------------------------------------------------------- config and data

def reference_subset(labels: list[int], fraction: float, seed: int) -> list[int]:
    """stratified_subset as its docstring specifies it, in plain Python: round(fraction x N) examples
    (at least one per class), split over the classes by largest remainders (ties: lower label first),
    one numpy-generator permutation per class in label order, the first `take` of each, sorted."""
    import math

    classes = sorted(set(labels))
    members = {c: [i for i, label in enumerate(labels) if label == c] for c in classes}
    n = len(labels)
    total = min(max(round(fraction * n), len(classes)), n)
    quota = {c: total * len(members[c]) / n for c in classes}
    take = {c: max(math.floor(quota[c]), 1) for c in classes}
    by_remainder = sorted(classes, key=lambda c: (-(quota[c] - math.floor(quota[c])), c))
    with_room = [c for c in by_remainder if take[c] < len(members[c])]
    for c in with_room[:max(total - sum(take.values()), 0)]:
        take[c] += 1
    while sum(take.values()) > total:  # the one-per-class minimum overshot: back from the most above quota
        c = max((c for c in classes if take[c] > 1), key=lambda c: (take[c] - quota[c], -c))
        take[c] -= 1
    rng = np.random.default_rng(seed)
    return sorted(i for c in classes for i in rng.permutation(members[c])[:take[c]].tolist())


def test_label_fraction_is_stratified_and_seeded(compose, cache_dir):
    """Catches: subsets that drop a class, lose the proportions, ignore the seed or are not nested; an
    allocation other than largest remainders (the 7/7/6 case by hand); and fine-tuning and ssltrain-probe
    labelling different examples: both are compared with an independent reference implementation (the
    old check compared the probe function with itself, as it wraps the fine-tuning one)."""
    from ssltrain.data.labelled import docs_topic_task, stratified_subset

    labels = np.asarray(docs_topic_task(str(cache_dir))["train"]["label"])
    counts = collections.Counter(labels.tolist())
    smaller = np.arange(0)
    for fraction in (0.005, 0.01, 0.1, 0.5):
        subset = stratified_subset(labels, fraction, seed=0)
        got = collections.Counter(labels[subset].tolist())
        assert set(got) == set(counts), "every class stays present"
        assert len(subset) == max(round(fraction * len(labels)), len(counts))
        quota = {c: len(subset) * n / len(labels) for c, n in counts.items()}
        assert all(abs(got[c] - quota[c]) < 1 or got[c] == 1 for c in counts), "class proportions kept"
        assert np.array_equal(subset, stratified_subset(labels, fraction, seed=0)), "same seed, same subset"
        assert not np.array_equal(subset, stratified_subset(labels, fraction, seed=1)), "another seed, another"
        assert set(smaller) <= set(subset), "for one seed the subsets are nested"
        smaller = subset
    assert np.array_equal(stratified_subset(labels, 1.0, seed=3), np.arange(len(labels)))
    # By hand: 7/7/6 examples, a quarter = 5: quotas 1.75/1.75/1.5 give 2/2/1 by largest remainders
    # (rounding each class would give 2/2/2 = 6 examples).
    small = np.array([0, 1, 2] * 6 + [0, 1])
    assert collections.Counter(small[stratified_subset(small, 0.25, seed=0)].tolist()) == {0: 2, 1: 2, 2: 1}

    # Against reference_subset (written from the docstring, not from the code): the fine-tuning subsets and
    # the probes' (ssltrain-probe) pick exactly its examples. A probe subset drawn with its own generator or
    # split, a single permutation across classes, per-class rounding or another seed use each break this.
    from ssltrain.evaluation.probe import stratified_subset as probe_subset

    for f in (0.005, 0.01, 0.1, 0.3, 1.0):
        for s in (0, 1):
            expected = reference_subset(labels.tolist(), f, s)
            assert stratified_subset(labels, f, s).tolist() == expected, (f, s)
            assert probe_subset(labels, f, s).tolist() == expected, (f, s)

    # Through the config key, as the CLI and `ssltrain -m data.label_fraction=...` set it: the run's seed draws.
    def train_rows(*overrides):
        _, _, examples = build(compose([*DIGITS, *overrides]))
        return np.asarray(examples["train"].with_format("numpy")["pixels"]).reshape(len(examples["train"]), -1)

    full, tenth = train_rows(), train_rows("data.label_fraction=0.1")
    assert abs(len(tenth) - 0.1 * len(full)) <= 10  # per-class rounding, 10 classes
    assert np.array_equal(tenth, train_rows("data.label_fraction=0.1"))
    assert not np.array_equal(tenth, train_rows("data.label_fraction=0.1", "seed=1"))
    with pytest.raises(ConfigError, match="data.label_fraction"):
        validate_config(compose([*DIGITS, "data.label_fraction=0"]))


def test_label_fraction_sweeps_from_the_command_line(cache_dir):
    from ssltrain.cli import job_overrides, preflight

    args = ["-m", "objective=classify", "data.label_fraction=0.1,0.5,1.0"]
    preflight(args)  # composes and validates each job
    assert [j[-1] for j in job_overrides(args[1:])] == [f"data.label_fraction={f}" for f in ("0.1", "0.5", "1.0")]


@pytest.mark.parametrize("overrides,needles", [
    (["objective=classify", "data=docs"], ["data=docs has no class labels", "docs_topics", "digits"]),
    (["objective=classify", "data=digits"], ["model=bert-tiny", "resnet-tiny", "vit-tiny"]),
    (["objective=classify", "data=digits", "model=vit-tiny", "model.config.image_size=16"], ["16x16", "8x8"]),
    (["objective=classify", "model=t5-tiny"], ["model=t5-tiny", "bert-tiny", "gpt2-tiny"]),
])
def test_incompatible_choices_fail_at_start_with_one_line(compose, overrides, needles):
    message = config_error(compose, overrides)
    assert all(n in message for n in needles), message


def test_cli_names_the_labelled_data_groups(run_cli, tmp_path):
    out = run_cli("objective=classify", "data=docs", timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssltrain: error:") and "docs_topics" in lines[0], out.stderr
    assert not (tmp_path / "outputs").exists()


# ---------------------------------------------------------------- head, groups, learning rates, freezing

def test_text_head_is_classifier_plus_pooler_and_groups_run_bottom_up(compose, tiny_tokenizer):
    objective = bert_classifier(compose, tiny_tokenizer)
    assert [g.name for g in objective.backbone_groups_top_down()] == BERT_GROUPS_TOP_DOWN
    head = {n for n, p in objective.model.named_parameters() if any(p is q for q in objective.head_params)}
    assert head == {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}
    n_backbone = sum(len(g.parameters()) for g in objective.groups)
    assert n_backbone + len(head) == len(list(objective.parameters())), "every weight in exactly one group"


def test_separate_learning_rates_land_in_the_optimizer_param_groups(compose):
    from ssltrain.optim import build_optimizer, build_scheduler

    cfg = compose([*DIGITS, "optimizer.lr=1e-3", "objective.head_lr_scale=10", "objective.backbone_lr_scale=0.5",
                   "objective.layer_lr_decay=0.5", "trainer.max_steps=10"])
    objective, _, _ = build(cfg)
    optimizer = build_optimizer(objective, cfg.optimizer)
    lrs = {}
    for group in optimizer.param_groups:
        lrs.setdefault(group["name"], set()).add(group["lr"])
    top_down = [f"backbone:{g.name}" for g in objective.backbone_groups_top_down()]
    assert list(lrs) == ["head", *top_down]
    expected = {"head": 1e-2, **{name: 5e-4 * 0.5 ** depth for depth, name in enumerate(top_down)}}
    assert {k: v.pop() for k, v in lrs.items()} == pytest.approx(expected)
    owned = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(owned) == sorted(id(p) for p in objective.parameters()), "each parameter once"
    scheduler = build_scheduler(optimizer, cfg.optimizer, 10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    now = scheduler.get_last_lr()
    assert now[0] > 0 and all(lr / now[0] == pytest.approx(g["initial_lr"] / optimizer.param_groups[0]["initial_lr"])
                              for lr, g in zip(now, optimizer.param_groups)), "the schedule keeps the ratios"

    probe, _, _ = build(compose([*DIGITS, "objective.freeze=backbone"]))
    groups = build_optimizer(probe, cfg.optimizer).param_groups
    assert {g["name"] for g in groups} == {"head"}
    assert all(not p.requires_grad for g in probe.groups for p in g.parameters())


def test_gradual_unfreezing_goes_top_down_in_equal_stages(compose, tiny_tokenizer):
    assert [unfrozen_groups(s, 40, 3) for s in (0, 9, 10, 19, 20, 29, 30, 39)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [unfrozen_groups(s, 40, 3, every=5) for s in (0, 5, 10, 15, 39)] == [0, 1, 2, 3, 3]

    objective = bert_classifier(compose, tiny_tokenizer, freeze="gradual").train()
    order = []
    for step in range(40):
        objective.on_step(step, 40)
        trainable = [g.name for g in objective.backbone_groups_top_down() if g.parameters()[0].requires_grad]
        assert all(all(p.requires_grad == (g.name in trainable) for p in g.parameters()) for g in objective.groups)
        assert all(p.requires_grad for p in objective.head_params)
        for group in objective.groups:  # frozen groups run without dropout
            assert all(m.training == (group.name in trainable) for m in group.modules)
        order += [name for name in trainable if name not in order]
        assert trainable == order[:len(trainable)], "always a top slice"
    assert order == BERT_GROUPS_TOP_DOWN
    objective.eval()
    assert not any(m.training for m in objective.modules())


# ---------------------------------------------------------------- end-to-end runs

@pytest.mark.slow
def test_finetune_from_an_mlm_export_learns_the_topics_and_exports_a_pipeline_classifier(compose, tmp_path):
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, pipeline

    from ssltrain.checkpoint import load_weights
    from ssltrain.data.labelled import TOPIC_PACKAGES
    from ssltrain.train import train

    torch.set_num_threads(1)  # 2 shared cores: one thread wastes less on contention
    pretrained = train(compose([*TINY, "trainer.max_steps=20"]), tmp_path / "mlm")["export"]

    cfg = compose([*TEXT, f"model.pretrained={pretrained}", "trainer.max_steps=200", "optimizer.lr=1e-3",
                   "trainer.checkpoint_every=200"])
    objective, tokenizer, examples = build(cfg)
    encoder = AutoModelForMaskedLM.from_pretrained(pretrained).bert.state_dict()
    loaded = objective.model.bert.state_dict()
    assert len(encoder) > 20 and all(torch.equal(loaded[name], t) for name, t in encoder.items()), \
        "the pretrained encoder weights load"

    result = train(cfg, tmp_path / "ft")
    evals = [r for r in read_metrics(result["run_dir"]) if r["kind"] == "eval"]
    first, last = evals[0], evals[-1]
    assert last["accuracy"] > 0.4 and last["accuracy"] > first["accuracy"] + 0.15, (first, last)  # chance 0.125
    assert last["macro_f1"] > 0.25, last
    assert {"loss", "accuracy", "macro_f1", *(f"f1/{p}" for p in TOPIC_PACKAGES)} <= set(last)

    # The export: the trained weights, tensor for tensor, in a plain transformers classifier.
    final = result["export"]
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert model.config.id2label == dict(enumerate(TOPIC_PACKAGES))
    trained = load_weights(result["run_dir"] / "checkpoints" / "step-00000200" / "model.safetensors")
    assert all(torch.equal(trained[f"model.{name}"], t) for name, t in model.state_dict().items())

    # Held-out metrics = scikit-learn's on the exported model's predictions for every held-out passage.
    val = {k: np.asarray(v) for k, v in examples["validation"].with_format("numpy")[:].items()}
    keep = val["label"] >= 0
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(val["input_ids"][keep]),
                       attention_mask=torch.as_tensor(val["attention_mask"][keep])).logits
    truth, pred = val["label"][keep], logits.argmax(1).numpy()
    assert keep.sum() == 251
    assert last["accuracy"] == pytest.approx(accuracy_score(truth, pred), abs=1e-6)
    assert last["macro_f1"] == pytest.approx(f1_score(truth, pred, average="macro"), abs=1e-6)

    classify = pipeline("text-classification", model=str(final), tokenizer=str(final))
    passage = "Return a new event loop and run the coroutine until it completes; tasks and futures."
    (out,) = classify(passage)
    with torch.no_grad():
        expected = model(**classify.tokenizer(passage, return_tensors="pt")).logits.argmax(-1).item()
    assert out["label"] == TOPIC_PACKAGES[expected] and 0 < out["score"] <= 1


@pytest.mark.slow
def test_digits_probe_on_a_rotation_export_keeps_the_backbone_bit_identical(compose, tmp_path):
    from transformers import AutoModel, AutoModelForImageClassification

    from ssltrain.checkpoint import load_weights
    from ssltrain.train import train

    torch.set_num_threads(1)  # 2 shared cores: one thread wastes less on contention
    rotation = compose(["objective=rotation", "trainer.max_steps=20", "trainer.batch_size=32",
                        "trainer.micro_batch_size=32", "trainer.log_every=10", "trainer.eval_every=0",
                        "trainer.eval_batches=2"])
    pretrained = train(rotation, tmp_path / "rotation")["export"]
    encoder = AutoModel.from_pretrained(pretrained).state_dict()  # weights and BatchNorm statistics

    cfg = compose([*DIGITS, f"model.pretrained={pretrained}", "objective.freeze=backbone", "optimizer.lr=1e-2",
                   "trainer.max_steps=60", "trainer.checkpoint_every=20", "trainer.keep_checkpoints=3"])
    result = train(cfg, tmp_path / "probe")
    evals = [r for r in read_metrics(result["run_dir"]) if r["kind"] == "eval"]
    assert evals[-1]["accuracy"] > 0.6 and evals[-1]["accuracy"] > evals[0]["accuracy"] + 0.3, evals
    heads = []
    for step in (20, 40, 60):
        state = load_weights(result["run_dir"] / "checkpoints" / f"step-{step:08d}" / "model.safetensors")
        assert all(torch.equal(state[f"model.resnet.{name}"], t) for name, t in encoder.items()), step
        heads.append(state["model.classifier.1.weight"])
    assert not torch.equal(heads[0], heads[1]) and not torch.equal(heads[1], heads[2]), "the head trains"

    model = AutoModelForImageClassification.from_pretrained(result["export"]).eval()
    assert model.config.id2label == {i: str(i) for i in range(10)}
    assert all(torch.equal(model.resnet.state_dict()[name], t) for name, t in encoder.items())
    assert torch.equal(model.classifier[1].weight, heads[2])

    # The export carries its image processor: a plain grey image becomes the pixels the model was
    # evaluated on (8-bit rounding aside).
    held_out, images = held_out_digit_images(cfg)
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(result["export"])
    except ImportError as err:  # transformers 5.17: AutoImageProcessor as a whole wants torchvision
        pytest.skip(f"this transformers has no AutoImageProcessor without torchvision: {str(err).strip()[:80]}")
    processed = processor(images, return_tensors="pt")["pixel_values"]
    assert processed.shape == held_out.shape and (processed - held_out).abs().max() <= 1 / 255


def held_out_digit_images(cfg, n: int = 40):
    """The first n held-out digits as the run saw them ((n, C, H, W) in [0, 1]) and as 8-bit PIL images."""
    import numpy as np
    from PIL import Image

    from ssltrain.data.corpus import load_corpus

    pixels = load_corpus(cfg.data, cfg.cache_dir)[0]["validation"].with_format("numpy")[:n]["pixels"]
    mode = "L" if pixels.shape[1] == 1 else "RGB"
    images = [Image.fromarray(np.round(p.transpose(1, 2, 0).squeeze(-1 if mode == "L" else ()) * 255)
                              .astype(np.uint8), mode=mode) for p in pixels]
    return torch.from_numpy(pixels), images


@pytest.mark.slow
def test_an_image_classifier_export_works_in_pipeline_with_its_saved_processor(compose, tmp_path):
    """pipeline("image-classification", model=<run>/final) with nothing else passed: the saved image
    processor turns RGB images into the model's inputs (pipelines convert every image to RGB, so this
    needs data.channels=3; a grey model takes its processor and model directly, as above)."""
    from transformers import AutoModelForImageClassification, pipeline

    from ssltrain.train import train

    cfg = compose([*DIGITS, "data.channels=3", "data.image_size=16", "trainer.max_steps=20"])
    export = train(cfg, tmp_path / "rgb")["export"]
    model = AutoModelForImageClassification.from_pretrained(export).eval()
    held_out, images = held_out_digit_images(cfg)
    with torch.no_grad():
        expected = model(pixel_values=held_out).logits.argmax(-1).tolist()
    predicted = [int(top[0]["label"]) for top in pipeline("image-classification", model=str(export))(images)]
    assert sum(p == e for p, e in zip(predicted, expected)) >= 36, (predicted, expected)


@pytest.mark.slow
def test_gradual_unfreezing_through_the_loop(compose, tmp_path):
    """Each stage changes exactly the groups the schedule has unfrozen (weights and BatchNorm statistics)."""
    from ssltrain.checkpoint import load_weights
    from ssltrain.train import train

    torch.set_num_threads(1)  # 2 shared cores: one thread wastes less on contention
    cfg = compose([*DIGITS, "objective.freeze=gradual", "trainer.max_steps=40", "trainer.checkpoint_every=10",
                   "trainer.batch_size=16", "trainer.micro_batch_size=16",
                   "trainer.keep_checkpoints=4", "optimizer.warmup_ratio=0"])
    result = train(cfg, tmp_path / "gradual")
    records = read_metrics(result["run_dir"])
    assert [r["unfrozen_groups"] for r in records if r["kind"] == "train"] == [0, 1, 2, 3]
    groups = ["embedder", "encoder.stages.0", "encoder.stages.1"]  # bottom-up
    states = [load_weights(result["run_dir"] / "checkpoints" / f"step-{s:08d}" / "model.safetensors")
              for s in (10, 20, 30, 40)]

    def changed(a, b) -> list[str]:
        return [g for g in groups if any(not torch.equal(a[k], b[k]) for k in a if k.startswith(f"model.resnet.{g}."))]

    # Steps 10-19 train the top stage, 20-29 also the one below, 30-39 everything.
    assert [changed(a, b) for a, b in zip(states, states[1:])] == [groups[2:], groups[1:], groups]


@pytest.mark.slow
def test_two_percent_of_the_docs_topics_labels_fine_tune_through_the_command_line(run_cli, tmp_path):
    """`ssltrain +experiment=finetune_docs data.label_fraction=0.02` as README's sample-efficiency sweeps type it:
    20 labelled passages, fewer than one micro-batch of 32. The loop repeats them to fill every micro-batch
    instead of refusing to start (prepare_data used to stop with "fewer than one micro-batch of 32"), and the
    held-out evaluation still sees each of the 251 test passages once."""
    run = tmp_path / "run"
    proc = run_cli("+experiment=finetune_docs", "data.label_fraction=0.02", "trainer.max_steps=4",
                   "trainer.eval_every=0", f"hydra.run.dir={run}", timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = read_metrics(run)
    start = next(r for r in records if r["kind"] == "start")
    assert (start["train_examples"], start["micro_batch_size"], start["batch_size"]) == (20, 32, 32)
    assert start["validation_examples"] >= 251
    assert len(set(start["rank_first_examples"][0])) == 4  # the first micro-batch draws distinct passages first
    end = next(r for r in records if r["kind"] == "end")
    assert end["step"] == 4 and end["tokens_seen"] > 0
    final_eval = [r for r in records if r["kind"] == "eval"][-1]
    assert 0.0 <= final_eval["accuracy"] <= 1.0
