from __future__ import annotations

import math

import pytest
import torch

from compression.stages.distill import kd_loss


def test_kd_loss_matches_hand_computation() -> None:
    s = torch.tensor([[2.0, 0.0, -1.0]])
    t = torch.tensor([[1.0, 1.0, 0.0]])
    y = torch.tensor([0])
    alpha, temp = 0.3, 2.0

    def softmax(v: list[float]) -> list[float]:
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]

    ps = softmax([2.0, 0.0, -1.0])
    ce = -math.log(ps[0])
    pt_T = softmax([0.5, 0.5, 0.0])
    ps_T = softmax([1.0, 0.0, -0.5])
    kl = sum(p * math.log(p / q) for p, q in zip(pt_T, ps_T, strict=True))
    expected = alpha * ce + (1 - alpha) * temp**2 * kl
    assert kd_loss(s, t, y, alpha, temp).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_is_plain_ce_at_alpha_one() -> None:
    g = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g), torch.tensor([0, 1, 2, 3])
    assert kd_loss(s, t, y, 1.0, 3.0).item() == pytest.approx(torch.nn.functional.cross_entropy(s, y).item())


def test_kd_loss_soft_part_vanishes_when_student_equals_teacher() -> None:
    # float64: in float32 the KL of identical inputs is rounding noise of about 1e-7, times T^2 = 16.
    s = torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([1, 2, 3])
    assert kd_loss(s, s.clone(), y, 0.0, 4.0).item() == pytest.approx(0.0, abs=1e-9)


def test_soft_only_rows_have_no_hard_label_term() -> None:
    """Augmented copies carry label -100: a batch of only those is pure distillation."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    soft_only = torch.tensor([-100, -100])
    assert kd_loss(s, t, soft_only, 0.5, 2.0).item() == pytest.approx(0.5 * kd_loss(s, t, soft_only, 0.0, 2.0).item())


def test_distillation_loss_reads_the_teacher_logits_of_the_batch_rows() -> None:
    from types import SimpleNamespace

    from compression.stages.distill import DistillationLoss

    g = torch.Generator().manual_seed(2)
    teacher_logits = torch.randn(5, 3, generator=g)
    student = torch.randn(2, 3, generator=g)
    batch = {
        "input_ids": torch.zeros(2, 4, dtype=torch.long),
        "attention_mask": torch.ones(2, 4, dtype=torch.long),
        "labels": torch.tensor([0, 2]),
        "index": torch.tensor([4, 1]),
    }

    def model(**_: object) -> SimpleNamespace:
        return SimpleNamespace(logits=student)

    loss = DistillationLoss(0.3, 2.0, teacher_logits)(model, batch)
    assert loss.item() == pytest.approx(kd_loss(student, teacher_logits[[4, 1]], batch["labels"], 0.3, 2.0).item())
    with pytest.raises(ValueError, match="needs the teacher"):
        DistillationLoss(0.3, 2.0, teacher_logits, hidden_weight=1.0)


def test_hidden_state_transfer_adds_a_layer_matching_term() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    from compression.stages.distill import DistillationLoss, make_student

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    teacher = BertForSequenceClassification(cfg).eval()
    student = make_student(teacher, [0, 2]).eval()
    batch = {
        "input_ids": torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(3)),
        "attention_mask": torch.ones(2, 5, dtype=torch.long),
        "labels": torch.tensor([0, 1]),
        "index": torch.tensor([0, 1]),
    }
    logits = torch.zeros(2, 3)
    plain = DistillationLoss(0.5, 2.0, logits)(student, batch)
    with_hidden = DistillationLoss(0.5, 2.0, logits, hidden_weight=1.0, layers=[0, 2], teacher=teacher)(student, batch)
    # Student layer 0 is teacher layer 0 (no difference); student layer 1 is teacher layer 2 fed layer 0's output.
    assert with_hidden.item() > plain.item()
    # A student with every teacher layer matches its hidden states exactly: the term vanishes.
    copy = make_student(teacher, [0, 1, 2, 3]).eval()
    hidden = DistillationLoss(0.5, 2.0, logits, hidden_weight=1.0, layers=[0, 1, 2, 3], teacher=teacher)
    assert hidden(copy, batch).item() == pytest.approx(DistillationLoss(0.5, 2.0, logits)(copy, batch).item(), abs=1e-6)
