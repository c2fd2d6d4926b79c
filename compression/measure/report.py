"""What a team needs to trust a build, from the served path's decisions on validation: each intent's precision,
recall and support, the pairs most often confused, and the OOS operating point (the share of in-scope queries
rejected, and of out-of-scope ones caught where validation has any). The artifact stage puts it in the card's
metrics (`validation_report`), so `GET /model` shows it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

CONFUSED_PAIRS = 10


def validation_report(pred: np.ndarray, gold: np.ndarray, labels: list[str], oos_index: int) -> dict[str, Any]:
    """Per-intent figures (the OOS label among them), the most confused (gold, predicted) pairs, and the
    operating point. Precision is None for an intent never predicted; recall for one with no example."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    if pred.shape != gold.shape or pred.ndim != 1:
        raise ValueError(f"pred and gold must be the same 1-d shape, got {pred.shape} and {gold.shape}")
    n = len(labels)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (gold, pred), 1)
    intents = {}
    for i, name in enumerate(labels):
        hit, predicted, support = int(confusion[i, i]), int(confusion[:, i].sum()), int(confusion[i].sum())
        intents[name] = {
            "precision": round(hit / predicted, 4) if predicted else None,
            "recall": round(hit / support, 4) if support else None,
            "support": support,
        }
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:CONFUSED_PAIRS]
    pairs = [
        {"intent": labels[g], "predicted": labels[p], "count": int(off[g, p])}
        for g, p in (np.unravel_index(k, off.shape) for k in order)
        if off[g, p] > 0
    ]
    in_scope = gold != oos_index
    operating: dict[str, Any] = {
        "in_scope_n": int(in_scope.sum()),
        "in_scope_rejected": round(float((pred[in_scope] == oos_index).mean()), 4) if in_scope.any() else None,
        "oos_n": int((~in_scope).sum()),
        "oos_recall": round(float((pred[~in_scope] == oos_index).mean()), 4) if (~in_scope).any() else None,
    }
    return {"intents": intents, "most_confused": pairs, "oos_operating_point": operating}


REPORT_FILE = "report.md"


def threshold_policy(metrics: Mapping[str, Any]) -> dict[str, float] | None:
    """A card's threshold policy (`metrics.oos_threshold_policy`), or for cards written before it was recorded,
    their in-scope accuracy target."""
    policy = metrics.get("oos_threshold_policy")
    if isinstance(policy, dict):
        return policy
    pools = metrics.get("oos_pools")
    target = pools.get("in_scope_target") if isinstance(pools, dict) else None
    return {"in_scope_accuracy": float(target)} if isinstance(target, int | float) else None


def describe_policy(policy: Mapping[str, float] | None) -> str:
    """What a threshold policy sets the threshold to do, in words."""
    if policy is None:
        return "a setting the card does not record"
    if "in_scope_rejection" in policy:
        return f"reject at most {policy['in_scope_rejection']:.1%} of in-scope validation queries"
    return f"keep in-scope validation accuracy at {policy['in_scope_accuracy']}"


def _over_the_rate(point: Mapping[str, Any], policy: Mapping[str, float] | None) -> str:
    """Why a rejection rate above the one the threshold was set to is no contradiction, where it is above it."""
    rate, rejected = (policy or {}).get("in_scope_rejection"), point.get("in_scope_rejected")
    if rate is None or rejected is None or rejected <= rate + 1e-12:
        return ""
    return (
        f" More than {rate:.1%}: the classifier itself answers `oos` to these, which no threshold changes, and the "
        "rule rejects none beyond them."
    )


def _share(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict[str, Any], name: str, version: str, policy: Mapping[str, float] | None) -> str:
    """The validation report as a page a team reads beside its model (REPORT_FILE): the OOS operating point, the
    most-confused pairs, then every intent, the weakest recall first."""
    point = report["oos_operating_point"]
    lines = [
        f"# {name} {version}: validation report",
        "",
        "The served path's decisions (every stage and the OOS rule) on the validation examples; `GET /model` shows",
        "the same figures under `metrics.validation_report`.",
        "",
        "## Out of scope",
        "",
        f"- The OOS rule's threshold is set to {describe_policy(policy)}.",
        f"- In-scope validation queries rejected as out of scope: {_share(point['in_scope_rejected'], 4)} "
        f"of {point['in_scope_n']}.{_over_the_rate(point, policy)}",
        f"- Out-of-scope validation queries caught: {_share(point['oos_recall'], 4)} of {point['oos_n']}"
        + (" (no out-of-scope examples were given)." if not point["oos_n"] else "."),
        "",
        "## Most confused",
        "",
        "| intent | predicted as | count |",
        "|---|---|---|",
        *(f"| {p['intent']} | {p['predicted']} | {p['count']} |" for p in report["most_confused"]),
        "",
        "## Every intent, the weakest recall first",
        "",
        "| intent | precision | recall | support |",
        "|---|---|---|---|",
    ]
    rows = sorted(report["intents"].items(), key=lambda kv: (kv[1]["recall"] is None, kv[1]["recall"] or 0, kv[0]))
    lines += [f"| {i} | {_share(v['precision'])} | {_share(v['recall'])} | {v['support']} |" for i, v in rows]
    return "\n".join(lines) + "\n"


def write_page(directory: Path, name: str, version: str, metrics: Mapping[str, Any]) -> None:
    """REPORT_FILE beside a model, from its card's name, version and metrics (their validation_report, where the
    card has one)."""
    if "validation_report" in metrics:
        page = markdown(metrics["validation_report"], name, version, threshold_policy(metrics))
        (directory / REPORT_FILE).write_text(page)
