"""A team's own labelled examples, in plain files: CSV with a header (`text,intent` by default) or JSONL (one
`{"text": ..., "intent": ...}` object per line). They become the same `Dataset` as CLINC150's JSON: `train`,
`val` (a given file, else a stratified split with a fixed seed), and, where out-of-scope examples are given,
`oos_val`, which no stage trains on and which `val` also holds, labelled `oos`, as in CLINC150.

Bad data is refused with one FactoryError naming the file and the line, before any stage writes anything:
an empty file, text that is not UTF-8, an empty text or intent, a missing column, one text with two intents,
an intent named like the out-of-scope label, an intent with too few examples to hold one out, a validation
intent that training lacks, and a validation text that training already has.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from compression.data import OOS, OOS_TUNE, Dataset, Split, label_order
from compression.errors import FactoryError

SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True)
class Columns:
    """Which CSV columns or JSONL keys hold the text and the intent."""

    text: str = "text"
    intent: str = "intent"


@dataclass(frozen=True)
class Example:
    text: str
    intent: str
    line: int  # its line in its file, 1-based, for error messages (a CSV text over several: the last)


def text_key(text: str) -> str:
    """Texts that the served model cannot tell apart (it is uncased, and the tokenizer splits on whitespace)
    count as one text."""
    return " ".join(text.split()).casefold()


def _decoded(path: Path) -> str:
    if not path.is_file():
        raise FactoryError(f"data file not found: {path}")
    raw = path.read_bytes()
    for number, line in enumerate(raw.split(b"\n"), 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FactoryError(f"{path}, line {number}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    text = raw.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark from spreadsheet exports
    if not text.strip():
        raise FactoryError(f"{path}: the file is empty")
    return text


def _csv_rows(path: Path, text: str, columns: Columns, need_intent: bool) -> Iterator[tuple[int, str, str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    wanted = [columns.text, columns.intent] if need_intent else [columns.text]
    missing = [c for c in wanted if c not in header]
    if missing:
        raise FactoryError(
            f"{path}, line 1: no column {', '.join(repr(c) for c in missing)} in the header "
            f"({', '.join(repr(h) for h in header)}); name the columns with --text-column and --intent-column"
        )
    try:
        for row in reader:
            # The row's last line: its only one, unless a quoted text spans lines.
            if any(v is None for v in row.values()) or None in row:
                raise FactoryError(
                    f"{path}, line {reader.line_num}: {len(header)} fields expected (quote a text that holds a comma)"
                )
            yield reader.line_num, row[columns.text], row.get(columns.intent, "") or ""
    except csv.Error as exc:
        raise FactoryError(f"{path}, line {reader.line_num}: {exc}") from None


def _jsonl_rows(path: Path, text: str, columns: Columns, need_intent: bool) -> Iterator[tuple[int, str, str]]:
    wanted = [columns.text, columns.intent] if need_intent else [columns.text]
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FactoryError(f"{path}, line {number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise FactoryError(f"{path}, line {number}: expected an object with {', '.join(map(repr, wanted))}")
        for key in wanted:
            if not isinstance(row.get(key), str):
                raise FactoryError(f"{path}, line {number}: {key!r} must be a string")
        yield number, row[columns.text], row.get(columns.intent, "") if need_intent else ""


def read_examples(path: Path | str, columns: Columns = Columns(), need_intent: bool = True) -> list[Example]:
    """The file's examples in order, exact repeats (same text, same intent) dropped; FactoryError on bad data.
    Without `need_intent` (out-of-scope examples) only the text column is read."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise FactoryError(f"{path}: unknown format {path.suffix!r}; give a .csv, .jsonl or CLINC150 .json file")
    text = _decoded(path)
    rows = (_csv_rows if path.suffix == ".csv" else _jsonl_rows)(path, text, columns, need_intent)
    examples: list[Example] = []
    seen: dict[str, Example] = {}
    for number, body, intent in rows:
        intent = intent.strip()
        if not body.strip():
            raise FactoryError(f"{path}, line {number}: empty text")
        if need_intent and not intent:
            raise FactoryError(f"{path}, line {number}: empty intent")
        if need_intent and intent.casefold() == OOS:
            raise FactoryError(
                f"{path}, line {number}: the intent {intent!r} is the out-of-scope label; rename it, or put "
                "out-of-scope examples in their own file (--oos-data)"
            )
        example = Example(body, intent, number)
        earlier = seen.get(text_key(body))
        if earlier is not None:
            if earlier.intent != intent:
                raise FactoryError(
                    f"{path}, line {number}: the text {body[:60]!r} is {intent!r} here and {earlier.intent!r} on "
                    f"line {earlier.line}"
                )
            continue
        seen[text_key(body)] = example
        examples.append(example)
    if not examples:
        raise FactoryError(f"{path}: no examples")
    return examples


def stratified_split(examples: list[Example], share: float, seed: int, path: Path) -> tuple[Split, Split]:
    """Train and validation with `share` of each intent's examples held out (at least one, and at least one
    left to train on), chosen by `seed`: the same file and seed always give the same split."""
    by_intent: dict[str, list[Example]] = {}
    for example in examples:
        by_intent.setdefault(example.intent, []).append(example)
    train: list[Example] = []
    val: list[Example] = []
    for intent in sorted(by_intent):
        rows = by_intent[intent]
        if len(rows) < 2:
            raise FactoryError(
                f"{path}, line {rows[0].line}: the intent {intent!r} has 1 example; at least 2 are needed to hold "
                "one out for validation (add examples, or give a validation file with --val-data)"
            )
        order = list(rows)
        random.Random(f"{seed}:{intent}").shuffle(order)
        held = min(len(rows) - 1, max(1, round(len(rows) * share)))
        val += order[:held]
        train += order[held:]
    train.sort(key=lambda e: e.line)
    val.sort(key=lambda e: e.line)
    return _split(train), _split(val)


def _split(examples: list[Example]) -> Split:
    return Split([e.text for e in examples], [e.intent for e in examples])


def load_labelled(
    path: Path | str,
    val_path: Path | str | None = None,
    oos_path: Path | str | None = None,
    columns: Columns = Columns(),
    val_share: float = 0.1,
    seed: int = 42,
) -> Dataset:
    """The dataset of a team's files: training examples, optional validation examples and optional out-of-scope
    examples (texts only)."""
    path = Path(path)
    if not 0 < val_share < 1:
        raise FactoryError(f"the validation share must be between 0 and 1, got {val_share}")
    examples = read_examples(path, columns)
    intents = {e.intent for e in examples}
    if len(intents) < 2:
        # One class gives the classifier nothing to learn and several OOS rules nothing to compare.
        raise FactoryError(
            f"{path}: every example is the intent {intents.pop()!r}; the model chooses among intents, so at least 2 "
            "are needed (out-of-scope examples go in their own file, --oos-data)"
        )
    if val_path is None:
        train, val = stratified_split(examples, val_share, seed, path)
    else:
        val_path = Path(val_path)
        given = read_examples(val_path, columns)
        trained = {text_key(e.text): e for e in examples}
        intents = {e.intent for e in examples}
        for example in given:
            if example.intent not in intents:
                raise FactoryError(f"{val_path}, line {example.line}: the intent {example.intent!r} is not in {path}")
            twin = trained.get(text_key(example.text))
            if twin is not None:
                raise FactoryError(
                    f"{val_path}, line {example.line}: the text is also in {path} (line {twin.line}); validation "
                    "examples must be unseen in training"
                )
        train, val = _split(examples), _split(given)
    splits = {"train": train, "val": val}
    if oos_path is not None:
        oos_path = Path(oos_path)
        outside = read_examples(oos_path, columns, need_intent=False)
        known = {text_key(t) for t in train.texts + val.texts}
        for example in outside:
            if text_key(example.text) in known:
                raise FactoryError(
                    f"{oos_path}, line {example.line}: the text is also an in-scope example; an out-of-scope "
                    "example cannot be in scope too"
                )
        # Half of them (seeded) choose the OOS rule beside the held-out Wikipedia sentences; the other half,
        # which nothing is chosen on, is the pool the card reports OOS recall on (compression.measure.pools).
        order = random.Random(f"{seed}:oos").sample(range(len(outside)), len(outside))
        tune = sorted(order[: len(outside) // 2])
        held = sorted(order[len(outside) // 2 :])
        splits[OOS_TUNE] = Split([outside[i].text for i in tune], [OOS] * len(tune))
        splits["oos_val"] = Split([outside[i].text for i in held], [OOS] * len(held))
        splits["val"] = val + splits["oos_val"]
    return Dataset(labels=label_order(train.intents), splits=splits)
