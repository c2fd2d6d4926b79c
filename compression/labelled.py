"""A team's own labelled examples, in plain files: CSV with a header (`text,intent` by default) or JSONL (one
`{"text": ..., "intent": ...}` object per line). They become the same `Dataset` as CLINC150's JSON: `train`,
`val` (a given file, else a stratified split with a fixed seed), and, where out-of-scope examples are given,
`oos_val`, which no stage trains on and which `val` also holds, labelled `oos`, as in CLINC150.

Bad data is refused with one FactoryError naming the file and the line, before any stage writes anything:
an empty file, text that is not UTF-8 (or, in JSONL, half a surrogate pair), an empty text or intent, a missing
or doubled column or key, a stray or unclosed quote in a CSV, one text with two intents,
an intent named like the out-of-scope label, an intent with too few examples to hold one out, a validation
intent that training lacks, and a validation text that training already has.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from compression.data import OOS, OOS_TUNE, Dataset, Split, label_order, text_key
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
    line: int  # its line in its file, 1-based, for error messages (a CSV row over several: its last)


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


# Only a comma separates CSV columns; a header of one column holding one of these was saved with another.
OTHER_SEPARATORS = (";", "\t", "|")


_QUOTE_HINT = 'inside a quoted text, write a quote as ""'
# What csv counts as the end of a line (io.StringIO with newline=""), so that line numbers agree with its own.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _csv_records(path: Path, text: str) -> Iterator[tuple[int, int, list[str]]]:
    """Each non-blank row's fields, with its first and last line: one line, unless a quoted field spans lines."""
    # strict=True: without it, a stray quote that opens a field silently swallows every line up to the next quote
    # (or the end of the file) into one text.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader, None)
        except csv.Error as exc:
            end, reason = reader.line_num, str(exc)
            hint = _QUOTE_HINT
            if reason.startswith("unexpected end of data"):
                reason = f"a quote opens a field here that is never closed (a stray quote? {hint})"
            elif "expected after" in reason and end > start:
                reason = f"a quoted text runs on to line {end}, where a quote ends it mid-field (a stray quote? {hint})"
            elif "expected after" in reason:
                reason = f"text after a closing quote ({hint})"
            elif end > start:  # the field size limit, say
                reason = f"a quoted text runs on to line {end}: {reason}"
            raise FactoryError(f"{path}, line {start}: {reason}") from None
        if row is None:
            return
        if row:
            yield start, reader.line_num, row


def _csv_rows(path: Path, text: str, columns: Columns, need_intent: bool) -> Iterator[tuple[int, str, str]]:
    records = _csv_records(path, text)
    _, line, header = next(records, (1, 1, []))
    wanted = [columns.text, columns.intent] if need_intent else [columns.text]
    twice = [c for c in wanted if header.count(c) > 1]
    if twice:
        raise FactoryError(f"{path}, line {line}: the column {twice[0]!r} is in the header twice; rename or remove one")
    missing = [c for c in wanted if c not in header]
    if missing:
        hint = "name the columns with --text-column and --intent-column"
        other = [s for s in OTHER_SEPARATORS if len(header) == 1 and s in header[0]]
        if other:
            hint = f"only a comma separates columns, not {other[0]!r}"
        raise FactoryError(
            f"{path}, line {line}: no column {', '.join(repr(c) for c in missing)} in the header "
            f"({', '.join(repr(h) for h in header)}); {hint}"
        )
    text_at = header.index(columns.text)
    intent_at = header.index(columns.intent) if columns.intent in header else None
    read = [(name, header.index(column)) for name, column in zip(("text", "intent"), wanted, strict=False)]
    for start, number, row in records:
        for name, at in read:
            if at < len(row) and _LINE_BREAK.search(row[at]):
                # Valid CSV, but an example is one message: the text of a stray quote that a later quote closes
                # at the end of a field, the rows between merged into it.
                begins = start + sum(len(_LINE_BREAK.findall(field)) for field in row[:at])
                ends = begins + len(_LINE_BREAK.findall(row[at]))
                raise FactoryError(
                    f"{path}, line {begins}: a quoted {name} runs on to line {ends}, where a quote closes it; an "
                    f"example is one line (a stray quote? {_QUOTE_HINT})"
                )
        if len(row) != len(header):
            raise FactoryError(
                f"{path}, line {number}: {len(header)} fields expected (quote a text that holds a comma)"
            )
        yield number, row[text_at], "" if intent_at is None else row[intent_at]


def _jsonl_rows(path: Path, text: str, columns: Columns, need_intent: bool) -> Iterator[tuple[int, str, str]]:
    wanted = [columns.text, columns.intent] if need_intent else [columns.text]
    # "\n" only: str.splitlines() also splits at U+2028, U+0085 and others, which a JSON string may hold as they are.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FactoryError(f"{path}, line {number}: not JSON ({exc.msg})") from None
        except (ValueError, RecursionError) as exc:  # JSON that Python will not hold: 5,000-digit numbers, deep nests
            raise FactoryError(f"{path}, line {number}: not JSON this reader takes ({type(exc).__name__})") from None
        if not isinstance(row, dict):
            raise FactoryError(f"{path}, line {number}: expected an object with {', '.join(map(repr, wanted))}")
        for key in wanted:
            if key not in row:
                keys = ", ".join(map(repr, row)) or "none"
                raise FactoryError(f"{path}, line {number}: no key {key!r} (its keys: {keys})")
            if not isinstance(row[key], str):
                raise FactoryError(f"{path}, line {number}: {key!r} must be a string")
            # A JSON escape can spell half a surrogate pair ("\ud800"), which no UTF-8 text holds: the tokenizer
            # fails on it in the middle of the build.
            try:
                row[key].encode("utf-8")
            except UnicodeEncodeError as exc:
                raise FactoryError(
                    f"{path}, line {number}: {key!r} holds {row[key][exc.start]!r}, half of a UTF-16 surrogate pair "
                    "and not a character"
                ) from None
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
