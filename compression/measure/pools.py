"""The pools out-of-scope detection is tuned and reported on, and their error bars.

No threshold is tuned on a real CLINC out-of-scope query: the OOS threshold comes from in-scope validation
alone, the rule and the cascade threshold from held-out Wikipedia sentences. So:
- `validation` is CLINC's validation split as it stands (3,000 in-scope + the 100 oos_val): the in-scope
  accuracy and the test-weighted accuracy of the bar.
- `oos_val` (100) is never trained on.
- `wiki_heldout` is the 2,000 Wikipedia sentences no stage trains on (compression.data.WIKI_POOL_SIZE). They
  are easier than real queries; the cascade's threshold and the choice of rule are tuned on them.
- A team's out-of-scope examples (`--oos-data`) are split in two: `oos_tune` joins the Wikipedia sentences in
  choosing the rule and the cascade threshold, and `oos_val`, chosen on by nothing, is reported on.
- With `--no-train-oos`, no stage trains on `oos_train` either, and `clinc_oos` = oos_train (250) + oos_val
  (100) is 350 real CLINC out-of-scope queries no model trained on: the pool OOS recall is reported on.
  With `--train-oos` the model learns from oos_train, which then is no pool, and the report falls back
  to oos_val.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from compression.data import OOS, OOS_TUNE, Dataset, Split, load_wiki_pool
from compression.errors import FactoryError
from compression.measure.metrics import score

REPORT_POOL = "clinc_oos"
TUNING_POOL = "wiki_heldout"
# What the card says of each pool, filled in with its own counts (pool_docs): a team's model had been described
# with CLINC150's.
POOL_DOCS = {
    "validation": "validation: {in_scope:,} in-scope queries and {oos:,} out-of-scope ones",
    REPORT_POOL: "oos_train + oos_val ({oos:,}): real out-of-scope queries no stage trains on",
    "oos_train": "the {oos:,} oos_train queries alone",
    "oos_val": "the {oos:,} oos_val queries alone",
    TUNING_POOL: "{oos:,} held-out Wikipedia sentences: no stage trains on them; the cascade and rule are tuned here",
    OOS_TUNE: "{oos:,} of the team's out-of-scope examples, half of them (--oos-data): the rule and the cascade are "
    "tuned here too",
}


def pool_docs(pools: dict[str, Split]) -> dict[str, str]:
    """POOL_DOCS of these pools, with their counts."""
    docs = {}
    for name, split in pools.items():
        oos = sum(intent == OOS for intent in split.intents)
        docs[name] = POOL_DOCS[name].format(in_scope=len(split) - oos, oos=oos)
    return docs


def evaluation_pools(data: Dataset, wiki: str) -> dict[str, Split]:
    """The pools of POOL_DOCS that no stage trains on, by name: `oos_val` where the dataset has out-of-scope
    examples, and `clinc_oos` and `oos_train` only when the training split holds no oos_train query
    (--no-train-oos)."""
    train = data.split("train")
    pools = {"validation": data.split("val"), TUNING_POOL: load_wiki_pool(wiki)}
    if "oos_val" in data.splits:
        pools["oos_val"] = data.split("oos_val")
    if data.optional(OOS_TUNE).texts:
        pools[OOS_TUNE] = data.split(OOS_TUNE)
    if "oos_train" in data.splits and OOS not in train.intents:
        pools[REPORT_POOL] = data.split("oos_train") + data.split("oos_val")
        pools["oos_train"] = data.split("oos_train")
    trained = set(train.texts)
    for name, pool in pools.items():
        if name != "validation" and set(pool.texts) & trained:
            raise FactoryError(f"pool {name} shares queries with the training split")
    return pools


def report_pool(pools: dict[str, Any]) -> str:
    """The pool OOS recall is reported on: the 350 real queries where the model never saw them, else oos_val,
    else (a dataset without out-of-scope examples) the held-out Wikipedia sentences, which thresholds are
    chosen on: the card's `report_pool` says which."""
    return next(name for name in (REPORT_POOL, "oos_val", TUNING_POOL) if name in pools)


def tuning_split(data: Dataset, wiki: str) -> Split:
    """In-scope validation plus the held-out Wikipedia sentences (and a team's `oos_tune` half): what thresholds
    are chosen on, so that no real CLINC out-of-scope query, and no query of the reported pool, is."""
    val = data.split("val")
    keep = [i for i, intent in enumerate(val.intents) if intent != OOS]
    in_scope = Split([val.texts[i] for i in keep], [val.intents[i] for i in keep])
    return in_scope + load_wiki_pool(wiki) + data.optional(OOS_TUNE)


def tuning_recall(pools: dict[str, Any]) -> float:
    """OOS recall over the pools the rule is chosen on (pool_scores figures by name), pooled: the held-out
    Wikipedia sentences, and a team's `oos_tune` half where it gave out-of-scope examples."""
    names = [name for name in (TUNING_POOL, OOS_TUNE) if name in pools]
    caught = sum(int(pools[name]["oos_caught"]) for name in names)
    return caught / sum(int(pools[name]["oos_n"]) for name in names)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n (95% by default): unlike the normal approximation it
    stays inside [0, 1] and is honest near the ends, where OOS recall lives."""
    if n <= 0:
        raise ValueError("an interval needs n > 0")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def pool_scores(pred: np.ndarray, gold: np.ndarray, oos: int) -> dict[str, Any]:
    """A pool's figures: the usual scores where it has in-scope queries, and the OOS recall with its 95%
    interval where it has out-of-scope ones."""
    out: dict[str, Any] = {"n": len(gold)}
    if (gold != oos).any():
        out.update(score(pred, gold, oos).as_dict())
    is_oos = gold == oos
    if is_oos.any():
        caught = int((pred[is_oos] == oos).sum())
        low, high = wilson(caught, int(is_oos.sum()))
        out.update(oos_n=int(is_oos.sum()), oos_caught=caught, oos_recall=round(caught / int(is_oos.sum()), 4))
        out["oos_recall_95"] = [round(low, 4), round(high, 4)]
    return out


def markdown_table(oos_pools: dict[str, Any]) -> str:
    """The card's `metrics.oos_pools` as a table: each rule on the transformer alone, then the served path. One
    column per out-of-scope pool the dataset has (CLINC150: clinc_oos, oos_train, oos_val, wiki_heldout), with
    its recall and 95% interval; "-" where a figure is undefined (test-weighted accuracy without any out-of-scope
    query in validation)."""
    rules = oos_pools.get("rules", {})
    first: dict[str, Any] = next(iter(rules.values()), {})
    sample = oos_pools.get("served") or first.get("pools", {})
    names = [n for n in (REPORT_POOL, "oos_train", "oos_val", TUNING_POOL, OOS_TUNE) if n in sample]
    sizes = " | ".join(f"{n} ({sample[n].get('oos_n', 0):,}) [95%]" for n in names)
    head = f"| OOS rule | {sizes} | validation in-scope | validation test-weighted |\n|---|{'---|' * (len(names) + 2)}"

    def figure(value: Any) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"

    def recall(pools: dict[str, Any], name: str) -> str:
        if name not in pools:
            return "trained on"
        low, high = pools[name]["oos_recall_95"]
        return f"{pools[name]['oos_recall']:.3f} [{low:.3f}, {high:.3f}]"

    def line(name: str, pools: dict[str, Any]) -> str:
        val = pools["validation"]
        cells = [recall(pools, n) for n in names]
        cells += [figure(val.get("in_scope_accuracy")), figure(val.get("test_weighted_accuracy"))]
        return f"| {name} | {' | '.join(cells)} |"

    rows = [line(f"{rule} (transformer alone)", v["pools"]) for rule, v in rules.items()]
    if "served" in oos_pools:
        rows.append(line("**served path** (cascade + served rule)", oos_pools["served"]))
    return "\n".join([head, *rows])
