"""The frontier tool on the committed model: its served point through the engine, and the first-stage threshold
sweep, checked against artifacts that really serve the swept thresholds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from compression.data import Dataset, load_clinc
from compression.measure import frontier
from compression.measure.report import threshold_policy
from tests import tiny_artifact
from tests.conftest import MODEL_DIR, linked_copy

FIGURES = (
    "macs_per_query",
    "in_scope_accuracy",
    "test_weighted_accuracy",
    "oos_val_recall",
    "clinc_oos_recall",
    "clinc_oos_recall_95",
    "neighbour_test_share",
)


@pytest.fixture(scope="module")
def data(data_path: Path) -> Dataset:
    return load_clinc(data_path)


@pytest.fixture(scope="module")
def served(data: Dataset) -> dict:
    return frontier.point(MODEL_DIR, data)


def _card() -> dict:
    card: dict = json.loads((MODEL_DIR / "card.json").read_text())
    return card


def test_the_sweep_at_the_cards_own_threshold_is_the_served_point(data: Dataset, served: dict) -> None:
    card = _card()
    tau = card["spec"]["stages"][0]["threshold"]
    swept = frontier.sweep(MODEL_DIR, data, [tau])[0]
    assert {k: swept[k] for k in FIGURES} == {k: served[k] for k in FIGURES}
    assert swept["answered_by"] == served["answered_by"]
    assert swept["rule_threshold"] == pytest.approx(card["spec"]["rule"]["threshold"])


def test_a_moved_threshold_is_what_an_artifact_serving_it_measures(data: Dataset, served: dict, tmp_path: Path) -> None:
    card = _card()
    tau = round(card["spec"]["stages"][0]["threshold"] + 0.1, 2)
    swept = frontier.sweep(MODEL_DIR, data, [tau])[0]
    moved = linked_copy(tmp_path / "moved")
    card["spec"]["stages"][0]["threshold"] = tau
    card["spec"]["rule"]["threshold"] = swept["rule_threshold"]
    (moved / "card.json").write_text(json.dumps(card))
    measured = frontier.point(moved, data)
    assert {k: swept[k] for k in FIGURES} == {k: measured[k] for k in FIGURES}
    assert swept["answered_by"] == measured["answered_by"]
    # A stricter first stage answers fewer queries, so more reach the transformer and cost more.
    first = card["spec"]["stages"][0]["name"]
    assert measured["answered_by"][first] < served["answered_by"][first]
    assert measured["macs_per_query"] > served["macs_per_query"]
    # The rule was set again by the card's policy (in-scope accuracy 0.952), which the served artifact keeps.
    policy = threshold_policy(card["metrics"])  # as the frontier tool reads it
    assert policy is not None
    assert measured["in_scope_accuracy"] >= policy["in_scope_accuracy"]


def test_thresholds_must_be_probabilities() -> None:
    assert frontier.thresholds_arg("0.8,0.6,0.8") == [0.6, 0.8]
    for bad in ("0", "1.2", "a,b", ""):
        with pytest.raises(Exception, match="threshold|numbers"):
            frontier.thresholds_arg(bad)


def test_an_artifact_without_a_first_stage_cannot_be_swept(data: Dataset, tmp_path: Path) -> None:
    tiny = tiny_artifact.make(tmp_path / "tiny", ["greet", "oos"], np.eye(2, dtype=np.float32))
    with pytest.raises(SystemExit, match="no static first stage"):
        frontier.sweep(tiny, data, [0.7])


def test_a_swept_point_counts_the_first_stages_net_in_scope_harm(data: Dataset, served: dict) -> None:
    """Recounted from each stage's own answers on validation: in-scope queries the first stage answers (its top
    probability at least the threshold, not `oos`) wrongly where the transformer's argmax is right, less the
    reverse; and both figures reach the printed table, blank for the artifact as built."""
    from app.engine.engine import Engine

    tau = 0.8
    swept = frontier.sweep(MODEL_DIR, data, [tau])[0]
    engine = Engine.open(MODEL_DIR)
    val = data.split("val")
    gold = np.array(val.label_ids(engine.labels))
    first, last = engine.outputs(val.texts, 0), engine.outputs(val.texts, -1)
    engine.close()
    top = np.exp(first.logits - first.logits.max(-1, keepdims=True))
    top = (top / top.sum(-1, keepdims=True)).max(-1)
    mine = (top >= tau) & (first.pred != engine.oos_index) & (gold != engine.oos_index)
    harm = int((mine & (first.pred != gold) & (last.pred == gold)).sum())
    helped = int((mine & (first.pred == gold) & (last.pred != gold)).sum())
    assert harm > 0  # the committed first stage makes in-scope mistakes at 0.8: the count is not vacuous
    assert swept["first_stage_net_harm"] == harm - helped
    table = frontier.markdown([served, swept]).splitlines()
    assert table[2].endswith("|  |  |")  # as built: neither figure
    assert table[3].endswith(f"| {swept['rule_threshold']:.2f} | {harm - helped} |")


def test_the_served_model_meets_issue_23s_cost_bar(served: dict) -> None:
    """Issue 23's cost bar on what the artifact decides, recomputed through the engine: at most 10 M multiply-adds
    per query (every stage, the rule's neighbour similarities included, each weighed by the rows that reach it), at
    most 35 MB of served files, and none of the 350 CLINC out-of-scope queries in any stage's training data. Its
    quality bar is test_model_artifact.test_the_served_model_meets_the_accuracy_bar's."""
    card = _card()
    assert served["macs_per_query"] <= 10_000_000
    assert sum(f["bytes"] for f in card["files"].values()) <= 35_000_000
    assert {stage: d["clinc_oos_queries"] for stage, d in card["provenance"]["data"].items()} == {
        "teacher": 0,
        "distill": 0,
        "prune": 0,
    }
