from __future__ import annotations

import math

import pytest
import torch

from compression.distill import kd_loss


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
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    assert kd_loss(s, t, y, 1.0, 3.0).item() == pytest.approx(torch.nn.functional.cross_entropy(s, y).item())


def test_kd_loss_soft_part_vanishes_when_student_equals_teacher() -> None:
    s = torch.randn(3, 6)
    y = torch.tensor([1, 2, 3])
    assert kd_loss(s, s.clone(), y, 0.0, 4.0).item() == pytest.approx(0.0, abs=1e-6)
