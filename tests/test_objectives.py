"""Objective maths against the spec and against slow, independently written references."""

from __future__ import annotations

import math

import pytest
import torch

from ssltrain.objectives.functional import (
    IGNORE_INDEX,
    mask_tokens,
    next_token_labels,
    token_cross_entropy,
)

MASK_ID, VOCAB = 4, 500
SPECIAL = (0, 1, 2, 3, 4)


def sample_mask_batch(mask_prob=0.15, p_mask=0.8, p_random=0.1, seed=0, shape=(256, 128)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIAL), VOCAB, shape, generator=g)
    ids[:, 0] = 2  # [CLS]
    ids[:, 50] = 3  # [SEP] inside the block
    special = torch.isin(ids, torch.tensor(SPECIAL))
    masked, labels = mask_tokens(ids, special, mask_prob=mask_prob, replace_with_mask=p_mask,
                                 replace_with_random=p_random, mask_token_id=MASK_ID, vocab_size=VOCAB, generator=g)
    return ids, special, masked, labels


def test_mlm_selects_15_percent_of_non_special_tokens_and_replaces_80_10_10():
    ids, special, masked, labels = sample_mask_batch()
    selected = labels != IGNORE_INDEX
    n_sel = selected.sum().item()
    n_candidates = (~special).sum().item()  # ~32k positions: binomial sd of the rate ~0.002
    assert abs(n_sel / n_candidates - 0.15) < 0.006
    assert not (selected & special).any(), "special tokens must never be selected"
    assert torch.equal(labels[selected], ids[selected]), "labels hold the original token"
    became_mask = (masked == MASK_ID) & selected
    unchanged = (masked == ids) & selected
    random_other = selected & ~became_mask & ~unchanged
    # A random replacement can draw the original token (1/VOCAB) or [MASK]; the tolerance covers it.
    assert abs(became_mask.sum().item() / n_sel - 0.8) < 0.015
    assert abs(unchanged.sum().item() / n_sel - 0.1) < 0.01
    assert abs(random_other.sum().item() / n_sel - 0.1) < 0.01
    assert torch.equal(masked[~selected], ids[~selected]), "unselected positions are untouched"


def test_mlm_rates_are_configurable_and_masking_is_seeded():
    _, special, masked, labels = sample_mask_batch(mask_prob=0.4, p_mask=1.0, p_random=0.0)
    selected = labels != IGNORE_INDEX
    assert abs(selected.sum().item() / (~special).sum().item() - 0.4) < 0.01
    assert (masked[selected] == MASK_ID).all()
    a, b = sample_mask_batch(seed=7)[2], sample_mask_batch(seed=7)[2]
    assert torch.equal(a, b)


def reference_cross_entropy(logits, labels):
    """Slow per-position log-softmax, written without F.cross_entropy."""
    total, n, correct = 0.0, 0, 0
    for row, label in zip(logits.reshape(-1, logits.shape[-1]).tolist(), labels.reshape(-1).tolist()):
        if label == IGNORE_INDEX:
            continue
        top = max(row)
        log_z = top + math.log(sum(math.exp(v - top) for v in row))
        total += log_z - row[label]
        n += 1
        correct += int(max(range(len(row)), key=row.__getitem__) == label)
    return total, n, correct


def test_token_cross_entropy_matches_reference_and_ignores_unlabelled_and_padding_rows():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, 12, generator=g)
    labels = torch.randint(10, (3, 7), generator=g)
    labels[0, :3] = IGNORE_INDEX
    loss, n, correct = token_cross_entropy(logits, labels, vocab_limit=10)
    ref_loss, ref_n, ref_correct = reference_cross_entropy(logits[..., :10], labels)
    assert n.item() == ref_n and correct.item() == ref_correct
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)


def test_ar_targets_are_inputs_shifted_by_one_and_loss_matches_reference():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(20, (2, 6), generator=g)
    logits = torch.randn(2, 6, 20, generator=g)
    targets = next_token_labels(ids)
    assert torch.equal(targets[:, :-1], ids[:, 1:]) and (targets[:, -1] == IGNORE_INDEX).all()
    loss, n, _ = token_cross_entropy(logits, targets)
    # Reference: position t predicts token t+1, summed over every sequence.
    ref = 0.0
    for b in range(2):
        for t in range(5):
            ref += -torch.log_softmax(logits[b, t], -1)[ids[b, t + 1]].item()
    assert n.item() == 10 and loss.item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.slow
def test_compiled_cross_entropy_equals_the_reference_in_value_and_gradient():
    """hardware.compile_loss routes token_cross_entropy through torch.compile: the same sums, counts
    and gradients (to float round-off) for 3-d logits with vocabulary padding, for 2-d logits whose
    row count changes per call (masked positions), with and without gradients."""
    from ssltrain.objectives import functional

    g = torch.Generator().manual_seed(3)
    cases = [(torch.randn(2, 9, 16, generator=g), torch.randint(13, (2, 9), generator=g), 13)]
    cases += [(torch.randn(n, 16, generator=g), torch.randint(16, (n,), generator=g), None) for n in (5, 11, 7)]
    cases[0][1][0, :4] = IGNORE_INDEX
    functional.use_compiled_loss(True)
    try:
        assert functional._compiled_loss is not None
        for logits, labels, limit in cases:
            leaf = logits.clone().requires_grad_(True)
            loss, n, correct = token_cross_entropy(leaf, labels, limit)
            loss.backward()
            kept = logits[..., :limit] if limit else logits
            ref_loss, ref_n, ref_correct = reference_cross_entropy(kept, labels)
            assert (n.item(), correct.item()) == (ref_n, ref_correct)
            assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
            # d(sum CE)/d logits = softmax - one-hot at labelled rows, zero at padding columns and unlabelled rows
            ref_grad = torch.zeros_like(logits)
            rows = labels != IGNORE_INDEX
            soft = torch.softmax(kept[rows], -1) - torch.nn.functional.one_hot(labels[rows], kept.shape[-1])
            ref_grad[rows] = torch.nn.functional.pad(soft, (0, logits.shape[-1] - kept.shape[-1]))
            torch.testing.assert_close(leaf.grad, ref_grad, rtol=1e-5, atol=1e-6)
            with torch.no_grad():
                assert token_cross_entropy(logits, labels, limit)[0].item() == pytest.approx(ref_loss, rel=1e-5)
    finally:
        functional.use_compiled_loss(False)
    assert functional._compiled_loss is None


@pytest.fixture
def tiny_tokenizer():
    from ssltrain.data.docs import pydoc_topic_documents
    from ssltrain.data.tokenizer import train_tokenizer

    return train_tokenizer([d["text"] for d in pydoc_topic_documents()[:30]], "wordpiece", 600)


def test_sparse_mlm_head_gives_the_dense_loss(compose, tiny_tokenizer):
    from ssltrain.objectives import build_objective

    cfg = compose(["trainer.seq_len=32"])
    torch.manual_seed(0)
    sparse = build_objective(cfg, tiny_tokenizer)
    dense = build_objective(compose(["objective.sparse_head=false"]), tiny_tokenizer)
    dense.load_state_dict(sparse.state_dict())
    assert sparse.sparse_head and not dense.sparse_head
    ids = torch.randint(5, len(tiny_tokenizer), (4, 32))
    batch = sparse.build_collator()({"input_ids": ids.numpy()}, torch.Generator().manual_seed(3))
    sparse.eval(), dense.eval()
    out_s, out_d = sparse(batch), dense(batch)
    assert out_s.loss.item() == pytest.approx(out_d.loss.item(), rel=1e-5)
    assert out_s.metrics["masked_acc"][0].item() == out_d.metrics["masked_acc"][0].item()
    out_s.loss.backward(), out_d.loss.backward()
    for (name, p_s), p_d in zip(sparse.named_parameters(), dense.parameters()):
        assert torch.allclose(p_s.grad, p_d.grad, atol=1e-6), name


class DataDependentShapes:
    """Records the ops whose output shape depends on tensor values (nonzero, masked_select, indexing
    with a bool mask): on a GPU each one copies a count to the host first, a sync that stalls the step."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        found = self.found = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
                name = str(func.overloadpacket)
                if name in ("aten.nonzero", "aten.masked_select") or (
                        name.startswith("aten.index") and any(t.dtype == torch.bool for t in tensors[1:])):
                    found.append(name)
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self.found

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def test_sparse_mlm_head_gathers_the_collators_positions_without_a_host_sync(compose, tiny_tokenizer):
    """The collator lists the masked positions (on the CPU); the objective gathers them with no op whose
    output shape depends on the data, and gets exactly the result of boolean indexing."""
    from ssltrain.objectives import build_objective

    torch.manual_seed(0)
    objective = build_objective(compose(["trainer.seq_len=32"]), tiny_tokenizer)
    objective.eval()
    ids = torch.randint(5, len(tiny_tokenizer), (4, 32))
    batch = objective.build_collator()({"input_ids": ids.numpy()}, torch.Generator().manual_seed(3))
    selected = batch["labels"] != -100
    assert batch["masked_positions"].tolist() == [i for i, s in enumerate(selected.flatten().tolist()) if s]
    with DataDependentShapes() as found:
        out = objective(batch)
        out.loss.backward()
    assert found == []
    without = {k: v for k, v in batch.items() if k != "masked_positions"}  # a hand-made batch: positions derived
    with DataDependentShapes() as found:
        again = objective(without)
    assert found and again.loss.item() == out.loss.item()
    assert again.metrics["masked_acc"][0].item() == out.metrics["masked_acc"][0].item()
