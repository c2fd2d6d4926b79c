"""compression.measure.report: per-intent precision and recall, the most confused pairs and the OOS operating
point, checked against counts worked out by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from compression.measure.report import CONFUSED_PAIRS, validation_report

LABELS = ["alarm", "balance", "oos"]


def test_figures_worked_out_by_hand() -> None:
    gold = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = np.array([0, 0, 1, 1, 2, 2, 2, 0, 2])
    report = validation_report(pred, gold, LABELS, oos_index=2)
    # alarm: 3 examples, 2 right; predicted 3 times (2 right, one oos query taken for alarm).
    assert report["intents"]["alarm"] == {"precision": round(2 / 3, 4), "recall": round(2 / 3, 4), "support": 3}
    # balance: 2 examples, 1 right; predicted twice (once for an alarm query).
    assert report["intents"]["balance"] == {"precision": 0.5, "recall": 0.5, "support": 2}
    assert report["intents"]["oos"] == {"precision": 0.75, "recall": 0.75, "support": 4}
    # Every off-diagonal cell once: ties keep the label order (gold, then predicted).
    assert report["most_confused"] == [
        {"intent": "alarm", "predicted": "balance", "count": 1},
        {"intent": "balance", "predicted": "oos", "count": 1},
        {"intent": "oos", "predicted": "alarm", "count": 1},
    ]
    # 5 in-scope queries, 1 rejected as oos; 4 out-of-scope, 3 caught.
    assert report["oos_operating_point"] == {"in_scope_n": 5, "in_scope_rejected": 0.2, "oos_n": 4, "oos_recall": 0.75}


def test_no_out_of_scope_queries_and_an_intent_never_predicted() -> None:
    gold = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 0, 0])
    report = validation_report(pred, gold, LABELS, oos_index=2)
    assert report["intents"]["balance"] == {"precision": None, "recall": 0.0, "support": 2}
    assert report["intents"]["oos"] == {"precision": None, "recall": None, "support": 0}
    assert report["most_confused"] == [{"intent": "balance", "predicted": "alarm", "count": 2}]
    assert report["oos_operating_point"] == {"in_scope_n": 4, "in_scope_rejected": 0.0, "oos_n": 0, "oos_recall": None}


def test_the_most_confused_are_the_largest_counts_and_at_most_ten() -> None:
    labels = [f"i{k}" for k in range(12)] + ["oos"]
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 13, 2000)
    pred = np.where(rng.random(2000) < 0.6, gold, rng.integers(0, 13, 2000))
    report = validation_report(pred, gold, labels, oos_index=12)
    pairs = report["most_confused"]
    assert len(pairs) == CONFUSED_PAIRS
    counts = [p["count"] for p in pairs]
    assert counts == sorted(counts, reverse=True)
    off = [int(((gold == g) & (pred == p)).sum()) for g in range(13) for p in range(13) if g != p]
    assert counts == sorted(off, reverse=True)[:CONFUSED_PAIRS]
    assert sum(v["support"] for v in report["intents"].values()) == 2000
    with pytest.raises(ValueError, match="same 1-d shape"):
        validation_report(pred[:5], gold[:4], labels, 12)


def test_the_page_beside_the_model_says_the_same_weakest_first() -> None:
    from compression.measure.report import markdown

    gold = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = np.array([0, 0, 1, 1, 2, 2, 2, 0, 2])
    report = validation_report(pred, gold, LABELS, oos_index=2)
    page = markdown(report, "my-intent", "2026.12.02-abcdef12", {"in_scope_rejection": 0.025})
    lines = page.splitlines()
    assert lines[0] == "# my-intent 2026.12.02-abcdef12: validation report"
    assert "- The OOS rule's threshold is set to reject at most 2.5% of in-scope validation queries." in lines
    # 1 of 5 in-scope queries is over the 2.5% aimed at: the classifier itself answers `oos` to it (found by an
    # audit, where the page said both without a word on why).
    assert (
        "- In-scope validation queries rejected as out of scope: 0.2000 of 5. More than 2.5%: the classifier itself "
        "answers `oos` to these, which no threshold changes, and the rule rejects none beyond them."
    ) in lines
    assert "More than" not in markdown(report, "m", "v", {"in_scope_rejection": 0.2})
    assert "- Out-of-scope validation queries caught: 0.7500 of 4." in lines
    assert "| alarm | balance | 1 |" in lines
    # balance (recall 0.5) before alarm (0.667) before oos (0.75).
    rows = [line for line in lines if line.startswith("| ") and line.count("|") == 5 and "support" not in line]
    assert rows == ["| balance | 0.500 | 0.500 | 2 |", "| alarm | 0.667 | 0.667 | 3 |", "| oos | 0.750 | 0.750 | 4 |"]
    target = markdown(report, "m", "v", {"in_scope_accuracy": 0.952})
    assert "- The OOS rule's threshold is set to keep in-scope validation accuracy at 0.952." in target.splitlines()
    none = validation_report(np.array([0, 0]), np.array([0, 1]), LABELS, oos_index=2)
    assert "caught: - of 0 (no out-of-scope examples were given)." in markdown(none, "m", "v", None)


def test_a_built_model_gets_its_report_and_nothing_that_decides_changes(tmp_path: Path, data_path: Path) -> None:
    """`python -m compression.measure.served_report DIR`: the report into the card's metrics and report.md; the
    spec, the files and the version stay as they were. A missing data file is one line and exit 2."""
    from compression.measure import served_report
    from tests.conftest import MODEL_DIR

    model = tmp_path / "model"
    shutil.copytree(MODEL_DIR, model)
    (model / "report.md").unlink()
    before = json.loads((model / "card.json").read_text())
    del before["metrics"]["validation_report"]
    (model / "card.json").write_text(json.dumps(before))
    assert served_report.main([str(model), "--data", str(data_path)]) == 0
    after = json.loads((model / "card.json").read_text())
    assert {k: v for k, v in after.items() if k != "metrics"} == {k: v for k, v in before.items() if k != "metrics"}
    assert after["metrics"] == {**before["metrics"], "validation_report": after["metrics"]["validation_report"]}
    # The same figures the committed card holds (tests/test_model_artifact.py recounts those from golden decisions).
    committed = json.loads((MODEL_DIR / "card.json").read_text())["metrics"]["validation_report"]
    assert after["metrics"]["validation_report"] == committed
    assert (model / "report.md").read_text() == (MODEL_DIR / "report.md").read_text()
    assert served_report.main([str(model), "--data", str(tmp_path / "none.json")]) == 2
