"""CLINC150-format JSON as `--data` gets the checks a team's CSV or JSONL gets (compression.labelled), with one
exception: a validation text that training also has is reported, not refused, so that CLINC150's own file, whose
val has 3, loads as it always has."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from app.engine.artifact import sha256_file
from compression.data import Dataset, load_clinc
from compression.errors import FactoryError
from compression.pipeline import Common, Context

TRAIN = [["Hello there", "greet"], ["hi", "greet"], ["book it", "book"], ["book a table", "book"]]
VAL = [["hey you", "greet"], ["reserve a table", "book"]]


def write(tmp_path: Path, obj: object) -> Path:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(obj))
    return path


BAD = [
    ("empty_intent", {"train": [*TRAIN, ["bye", " "]], "val": VAL}, "malformed row 4 in 'train': empty intent"),
    (
        "surrogate",
        {"train": TRAIN, "val": [*VAL, ["bad \ud800 surrogate", "greet"]]},
        "malformed row 2 in 'val': the text holds '\\ud800', half of a UTF-16 surrogate pair and not a character",
    ),
    (
        "one_intent",
        {"train": TRAIN[:2], "val": VAL[:1]},
        "{path}: every example in 'train' is the intent 'greet'; the model chooses among intents, so at least 2 are "
        "needed",
    ),
    (
        "no_examples",
        {"train": []},
        "{path}: 'train' has no examples; the model chooses among intents, so at least 2 are needed",
    ),
    (
        "two_labels",
        {"train": [*TRAIN, ["hello  THERE", "book"]], "val": VAL},
        "row 4 in 'train': the text 'hello  THERE' is 'book' here and 'greet' in row 0",
    ),
    (
        "two_labels_in_val",
        {"train": TRAIN, "val": [*VAL, ["hey  you", "book"]]},
        "row 2 in 'val': the text 'hey  you' is 'book' here and 'greet' in row 0",
    ),
    (
        "oos_label",
        {"train": [*TRAIN, ["what is love", "OOS"]], "val": VAL},
        "row 4 in 'train': the intent 'OOS' is the out-of-scope label; out-of-scope queries go in 'oos_train'",
    ),
    (
        "oos_in_scope",
        {"train": TRAIN, "val": VAL, "oos_val": [["tell me a joke", "oos"], ["Reserve a table", "oos"]]},
        "row 1 in 'oos_val': the text is also in scope (row 1 in 'val'); an out-of-scope example cannot be in scope "
        "too",
    ),
]


@pytest.mark.parametrize(("content", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_clinc_format_data_gets_one_exact_error(tmp_path: Path, content: dict, message: str) -> None:
    path = write(tmp_path, content)
    with pytest.raises(FactoryError) as refused:
        load_clinc(path)
    assert str(refused.value) == message.format(path=path)


def test_a_val_text_that_train_has_is_reported_in_one_line_and_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, {"train": TRAIN, "val": [*VAL, ["Book  it", "book"], ["HI", "greet"]]})
    data = load_clinc(path)
    assert data.split("val").texts == ["hey you", "reserve a table", "Book  it", "HI"]
    assert capsys.readouterr().out == (
        f"warning: {path}: 'train' also has 2 of the 4 texts of 'val', the first 'Book  it' (row 2); kept, as "
        "CLINC150's own val has 3\n"
    )
    load_clinc(write(tmp_path, {"train": TRAIN, "val": VAL}))
    assert capsys.readouterr().out == ""


def digest(data: Dataset) -> str:
    """Every split's texts and intents, in order, and the labels."""
    splits = {name: [split.texts, split.intents] for name, split in data.splits.items()}
    return hashlib.sha256(json.dumps([data.labels, splits]).encode()).hexdigest()


# Computed with load_clinc as it was before these checks (2026-12-07), on the shared clinc150_plus_train_val.json.
BEFORE = {
    False: "691eca07ee5dd53e114c4fcfbdac3547eb989ee3f59e3bd6eaff9ddb1590c5d9",
    True: "b64a55ae60d35690d9147e42f34519a69f0c5615da5b234dc096827349d7bdfa",
}


@pytest.mark.parametrize("train_oos", [False, True])
def test_clinc150s_own_file_loads_as_before_the_checks(
    data_path: Path, train_oos: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through the factory's own reader (the pipeline's Context): the same splits, texts, labels and order."""
    data = Context(Common(data=data_path, train_oos=train_oos)).dataset
    assert digest(data) == BEFORE[train_oos]
    assert capsys.readouterr().out == (
        f"warning: {data_path}: 'train' also has 3 of the 3000 texts of 'val', the first 'what is on my to do list' "
        "(row 1011); kept, as CLINC150's own val has 3\n"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"train": ' + "[" * 100_000 + "]" * 100_000 + "}", "is not JSON this reader takes (RecursionError)"),
        ('{"train": [], "val": ' + "9" * 5_000 + "}", "is not JSON this reader takes (ValueError)"),
    ],
    ids=["deep_nesting", "5000_digits"],
)
def test_json_python_will_not_hold_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    """Each had been a traceback."""
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(FactoryError) as refused:
        load_clinc(path)
    assert str(refused.value) == f"data file {path} {message}"


def test_an_empty_val_is_refused(tmp_path: Path) -> None:
    """Where it had been a ValueError at the embedder stage."""
    path = write(tmp_path, {"train": TRAIN, "val": []})
    with pytest.raises(FactoryError) as refused:
        load_clinc(path)
    assert str(refused.value) == (
        f"{path}: 'val' has no examples; the stages choose and report on it, so at least 1 is needed"
    )


def test_a_byte_order_mark_is_read_as_a_csv_or_jsonl_ones_is(tmp_path: Path) -> None:
    path = tmp_path / "exported.json"
    path.write_text("\ufeff" + json.dumps({"train": TRAIN, "val": VAL}), encoding="utf-8")
    assert load_clinc(path) == load_clinc(write(tmp_path, {"train": TRAIN, "val": VAL}))


def test_a_teams_clinc_format_file_is_not_named_clinc150_in_the_card(tmp_path: Path, data_path: Path) -> None:
    """By sha256: a team's file in CLINC150's format had been given CLINC150's source and licence."""
    team = Context(Common(data=write(tmp_path, {"train": TRAIN, "val": VAL}))).data_source
    assert team == {
        "name": "the team's own labelled examples, in CLINC150's JSON format",
        "file": "d.json",
        "sha256": hashlib.sha256((tmp_path / "d.json").read_bytes()).hexdigest(),
        "train_oos": False,
    }
    clinc = Context(Common(data=data_path, train_oos=True)).data_source
    assert (clinc["license"], clinc["sha256"], clinc["train_oos"]) == ("CC BY 3.0", sha256_file(data_path), True)


def test_the_card_describes_each_pool_with_its_own_counts(tmp_path: Path) -> None:
    """A team's pools had been described with CLINC150's wording and counts (3,000 in-scope, the 100 of oos_val)."""
    from compression.labelled import load_labelled
    from compression.measure.pools import evaluation_pools, pool_docs
    from tests.conftest import WIKI

    data, oos = tmp_path / "intents.csv", tmp_path / "oos.csv"
    data.write_text("text,intent\n" + "".join(f"{t},{i}\n" for t, i in TRAIN + VAL))
    oos.write_text("text\ntell me a joke\nwhat is love\nsing a song\n")
    docs = pool_docs(evaluation_pools(load_labelled(data, oos_path=oos, val_share=0.5), str(WIKI)))
    assert docs == {
        "validation": "validation: 4 in-scope queries and 2 out-of-scope ones",
        "wiki_heldout": "2,000 held-out Wikipedia sentences: no stage trains on them; the cascade and rule are tuned "
        "here",
        "oos_val": "the 2 oos_val queries alone",
        "oos_tune": "1 of the team's out-of-scope examples, half of them (--oos-data): the rule and the cascade are "
        "tuned here too",
    }
