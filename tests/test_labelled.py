"""A team's own labelled files (compression.labelled): CSV and JSONL read into the same dataset, a stratified
split with a fixed seed, and one exact error naming the file and line for each kind of bad data, from the
reader and through `python -m compression` (exit 2, one line, nothing written)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from compression.data import OOS, label_order
from compression.errors import FactoryError
from compression.labelled import Columns, load_labelled, read_examples, stratified_split
from tests.conftest import ROOT, run_cli

ROWS = [
    ("what is my balance", "balance"),
    ("how much money do I have", "balance"),
    ("balance please", "balance"),
    ("show my account balance", "balance"),
    ("book a flight to paris", "book_flight"),
    ("I need a plane ticket", "book_flight"),
    ("fly me to rome on friday", "book_flight"),
    ("set an alarm for 7", "alarm"),
    ("wake me up at six", "alarm"),
]


def csv_file(path: Path, rows: list[tuple[str, str]], header: str = "text,intent") -> Path:
    lines = [header] + [f'"{text}",{intent}' for text, intent in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def jsonl_file(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "intent": i}) + "\n" for t, i in rows), encoding="utf-8")
    return path


def test_csv_and_jsonl_give_the_same_dataset(tmp_path: Path) -> None:
    a = load_labelled(csv_file(tmp_path / "a.csv", ROWS), seed=7)
    b = load_labelled(jsonl_file(tmp_path / "b.jsonl", ROWS), seed=7)
    assert a == b
    assert a.labels == ["alarm", "balance", "book_flight", OOS]
    assert a.labels == label_order([i for _, i in ROWS])
    train, val = a.split("train"), a.split("val")
    # Every example lands in exactly one of the two.
    assert sorted(train.texts + val.texts) == sorted(t for t, _ in ROWS)
    assert set(a.splits) == {"train", "val"}


def test_the_split_is_stratified_and_fixed_by_the_seed(tmp_path: Path) -> None:
    rows = [(f"example {k} of {intent}", intent) for intent, n in (("a", 20), ("b", 10), ("c", 2)) for k in range(n)]
    examples = read_examples(csv_file(tmp_path / "d.csv", rows))
    train, val = stratified_split(examples, 0.1, seed=3, path=tmp_path / "d.csv")
    # 10% of each intent, at least one held out and at least one left to train on.
    assert Counter(val.intents) == {"a": 2, "b": 1, "c": 1}
    assert Counter(train.intents) == {"a": 18, "b": 9, "c": 1}
    assert stratified_split(examples, 0.1, 3, tmp_path / "d.csv") == (train, val)
    other = [stratified_split(examples, 0.1, seed, tmp_path / "d.csv")[1] for seed in range(4, 10)]
    assert any(v.texts != val.texts for v in other)
    # Order within each split is the file's.
    order = {text: i for i, (text, _) in enumerate(rows)}
    assert [order[t] for t in train.texts] == sorted(order[t] for t in train.texts)


OUTSIDE = ["tell me a joke", "who won the game", "sing a song", "what is love", "how tall is everest"]


def test_a_validation_file_and_out_of_scope_examples(tmp_path: Path) -> None:
    val = [("what's in my account", "balance"), ("alarm at noon", "alarm")]
    data = load_labelled(
        csv_file(tmp_path / "t.csv", ROWS),
        val_path=jsonl_file(tmp_path / "v.jsonl", val),
        oos_path=csv_file(tmp_path / "o.csv", [(t, "") for t in OUTSIDE], header="text,x"),
    )
    assert data.split("train").texts == [t for t, _ in ROWS]
    # Out-of-scope examples, labelled oos, in two seeded halves kept in the file's order: one tunes the choice of
    # rule, the other is a pool of its own and part of validation, as CLINC150's oos_val is.
    tune, held = data.split("oos_tune"), data.split("oos_val")
    assert (len(tune), len(held)) == (2, 3)
    assert sorted(tune.texts + held.texts) == sorted(OUTSIDE)
    assert tune.texts == [t for t in OUTSIDE if t in tune.texts]
    assert held.texts == [t for t in OUTSIDE if t in held.texts]
    assert set(tune.intents) == set(held.intents) == {OOS}
    assert data.split("val").texts == ["what's in my account", "alarm at noon", *held.texts]
    assert data.split("val").intents == ["balance", "alarm", OOS, OOS, OOS]
    assert data.optional("oos_train").texts == []
    again = load_labelled(tmp_path / "t.csv", tmp_path / "v.jsonl", tmp_path / "o.csv")
    assert again.split("oos_tune") == tune  # the same file always splits the same way
    # One example alone is reported on: nothing is tuned on it.
    one = load_labelled(tmp_path / "t.csv", oos_path=csv_file(tmp_path / "one.csv", [("tell me a joke", "")], "text,x"))
    assert (one.optional("oos_tune").texts, one.split("oos_val").texts) == ([], ["tell me a joke"])


def test_custom_columns_a_byte_order_mark_and_exact_repeats(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text('\ufeffutterance,label,note\nhi there,greet,x\n"hi, again",greet,y\nhi there,greet,z\n')
    examples = read_examples(path, Columns(text="utterance", intent="label"))
    assert [(e.text, e.intent, e.line) for e in examples] == [("hi there", "greet", 2), ("hi, again", "greet", 3)]


def test_quoted_texts_with_commas_quotes_and_lines(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text(
        'text,intent,note\n"hi, there",greet,\n"say ""hello""",greet,\r\nbook it,book,"two\nlines"\nbook now,book,\n'
    )
    examples = read_examples(path)
    # Only a column that is not read may run over several lines; its row counts as its last line.
    assert [(e.text, e.line) for e in examples] == [
        ("hi, there", 2),
        ('say "hello"', 3),
        ("book it", 5),
        ("book now", 6),
    ]


def test_jsonl_lines_end_at_newlines_only(tmp_path: Path) -> None:
    """U+2028, U+2029, U+0085 and the like are valid inside a JSON string: they do not end a line. Nor does a
    "\\n" escape, which no stray quote writes: it is kept, where a CSV text over several lines is refused."""
    path = tmp_path / "s.jsonl"
    texts = ["one\u2028two", "three\u2029four\u0085five", "plain", "a line\nbreak"]
    rows = "".join(json.dumps({"text": t, "intent": "i"}, ensure_ascii=False) + "\r\n" for t in texts)
    path.write_text(rows + '{"text": \n', encoding="utf-8", newline="")
    with pytest.raises(FactoryError) as refused:
        read_examples(path)
    assert str(refused.value) == f"{path}, line 5: not JSON (Expecting value)"
    path.write_text(rows, encoding="utf-8", newline="")
    assert [(e.text, e.line) for e in read_examples(path)] == [(t, n) for n, t in enumerate(texts, 1)]


def rows_with(bad_lines: dict[int, str], count: int) -> bytes:
    """A CSV of `count` lines, the header first, good examples on each line but those in `bad_lines`."""
    lines = [bad_lines.get(n, f"example {n} of it,{'odd' if n % 2 else 'even'}") for n in range(2, count + 1)]
    return "\n".join(["text,intent", *lines]).encode() + b"\n"


def bad(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


BAD = [
    ("empty.csv", b"", "{path}: the file is empty"),
    ("blank.jsonl", b"\n  \n", "{path}: the file is empty"),
    ("header.csv", b"text,intent\n", "{path}: no examples"),
    (
        "latin1.csv",
        b"text,intent\nhello,greet\ncaf\xe9,order\n",
        "{path}, line 3: not UTF-8 text (invalid continuation byte at byte 3)",
    ),
    ("empty_text.csv", b"text,intent\nhello,greet\n   ,greet\n", "{path}, line 3: empty text"),
    ("empty_intent.jsonl", b'{"text": "hello", "intent": " "}\n', "{path}, line 1: empty intent"),
    (
        "two_labels.csv",
        b"text,intent\nHello there,greet\nbook it,book\nhello  THERE,farewell\n",
        "{path}, line 4: the text 'hello  THERE' is 'farewell' here and 'greet' on line 2",
    ),
    (
        "deep.jsonl",
        b'{"text": "hi", "intent": "greet", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
        "{path}, line 1: not JSON this reader takes (RecursionError)",
    ),
    (
        "huge_number.jsonl",
        b'{"text": "hi", "intent": "greet", "x": ' + b"9" * 5000 + b"}\n",
        "{path}, line 1: not JSON this reader takes (ValueError)",
    ),
    (
        "accents.csv",
        "text,intent\nRésumé help,greet\nbook it,book\nresume help,farewell\n".encode(),
        "{path}, line 4: the text 'resume help' is 'farewell' here and 'greet' on line 2",
    ),
    (
        "punctuation_spacing.jsonl",
        b'{"text": "what\'s my balance", "intent": "balance"}\n{"text": "what \' s my balance", "intent": "bill"}\n',
        "{path}, line 2: the text \"what ' s my balance\" is 'bill' here and 'balance' on line 1",
    ),
    (
        "oos_label.csv",
        b"text,intent\nhello,greet\nwhat is love,OOS\n",
        "{path}, line 3: the intent 'OOS' is the out-of-scope label; rename it, or put out-of-scope examples in "
        "their own file (--oos-data)",
    ),
    (
        "columns.csv",
        b"sentence,label\nhello,greet\n",
        "{path}, line 1: no column 'text', 'intent' in the header ('sentence', 'label'); name the columns with "
        "--text-column and --intent-column",
    ),
    (
        "fields.csv",
        b"text,intent\nhello,greet\nhi, there,greet\n",
        "{path}, line 3: 2 fields expected (quote a text that holds a comma)",
    ),
    (
        "stray_quote.csv",
        rows_with({11: '"what is my, balance,accept_reservations', 32: 'my card "got" blocked,account_blocked'}, 41),
        "{path}, line 11: a quoted text runs on to line 32, where a quote ends it mid-field (a stray quote? inside a "
        'quoted text, write a quote as "")',
    ),
    (
        "merged_rows.csv",
        rows_with({11: '"what is my, balance,accept_reservations', 20: 'my card got blocked",account_blocked'}, 41),
        "{path}, line 11: a quoted text runs on to line 20, where a quote closes it; an example is one line (a stray "
        'quote? inside a quoted text, write a quote as "")',
    ),
    (
        "merged_intent.csv",
        b'note,text,intent\r\n"a\r\nnote",hello,"greet\r\nhi there,x,greet\r\nbook it,x,book"\r\nbook now,x,book\r\n',
        "{path}, line 3: a quoted intent runs on to line 5, where a quote closes it; an example is one line (a stray "
        'quote? inside a quoted text, write a quote as "")',
    ),
    (
        "unclosed_quote.csv",
        rows_with({11: '"unterminated quote,accept_reservations'}, 42),
        "{path}, line 11: a quote opens a field here that is never closed (a stray quote? inside a quoted text, "
        'write a quote as "")',
    ),
    (
        "after_quote.csv",
        b'text,intent\nhello,greet\n"hello" there,greet\n',
        '{path}, line 3: text after a closing quote (inside a quoted text, write a quote as "")',
    ),
    (
        "twice.csv",
        b"text,intent,text\nhello,greet,hi\nhey,greet,yo\nbook it,book,go\nbook now,book,ok\n",
        "{path}, line 1: the column 'text' is in the header twice; rename or remove one",
    ),
    (
        "semicolons.csv",
        b"text;intent\nhello;greet\n",
        "{path}, line 1: no column 'text', 'intent' in the header ('text;intent'); only a comma separates columns, "
        "not ';'",
    ),
    (
        "tabs.csv",
        b"text\tintent\nhello\tgreet\n",
        "{path}, line 1: no column 'text', 'intent' in the header ('text\\tintent'); only a comma separates columns, "
        "not '\\t'",
    ),
    ("notjson.jsonl", b'{"text": "a", "intent": "b"}\n{"text": \n', "{path}, line 2: not JSON (Expecting value)"),
    (
        "surrogate.jsonl",
        b'{"text": "hello", "intent": "greet"}\n{"text": "bad \\ud800 surrogate", "intent": "greet"}\n'
        b'{"text": "book it", "intent": "book"}\n{"text": "book now", "intent": "book"}\n',
        "{path}, line 2: 'text' holds '\\ud800', half of a UTF-16 surrogate pair and not a character",
    ),
    ("no_key.jsonl", b'{"text": "a"}\n', "{path}, line 1: no key 'intent' (its keys: 'text')"),
    ("list.jsonl", b'["a", "b"]\n', "{path}, line 1: expected an object with 'text', 'intent'"),
    ("number.jsonl", b'{"text": "a", "intent": 3}\n', "{path}, line 1: 'intent' must be a string"),
    ("data.tsv", b"text\tintent\n", "{path}: unknown format '.tsv'; give a .csv, .jsonl or CLINC150 .json file"),
    (
        "one_intent.csv",
        b"text,intent\nhello,greet\nhi,greet\nhey there,greet\n",
        "{path}: every example is the intent 'greet'; the model chooses among intents, so at least 2 are needed "
        "(out-of-scope examples go in their own file, --oos-data)",
    ),
    (
        "single.csv",
        b"text,intent\nhello,greet\nhi,greet\nbook it,book\n",
        "{path}, line 4: the intent 'book' has 1 example; at least 2 are needed to hold one out for validation (add "
        "examples, or give a validation file with --val-data)",
    ),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_data_gets_one_exact_error(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = bad(tmp_path, name, content)
    with pytest.raises(FactoryError) as refused:
        load_labelled(path)
    assert str(refused.value) == message.format(path=path)


def test_bad_validation_and_out_of_scope_files(tmp_path: Path) -> None:
    train = csv_file(tmp_path / "t.csv", ROWS)
    unknown = csv_file(tmp_path / "v1.csv", [("snooze it", "alarm"), ("play jazz", "music")])
    with pytest.raises(FactoryError) as refused:
        load_labelled(train, val_path=unknown)
    assert str(refused.value) == f"{unknown}, line 3: the intent 'music' is not in {train}"
    seen = csv_file(tmp_path / "v2.csv", [("Balance  please", "balance")])
    with pytest.raises(FactoryError) as refused:
        load_labelled(train, val_path=seen)
    assert str(refused.value) == (
        f"{seen}, line 2: the text is also in {train} (line 4); validation examples must be unseen in training"
    )
    in_scope = csv_file(tmp_path / "o.csv", [("tell me a joke", ""), ("wake me up at six", "")])
    with pytest.raises(FactoryError) as refused:
        load_labelled(train, oos_path=in_scope)
    assert str(refused.value) == (
        f"{in_scope}, line 3: the text is also an in-scope example; an out-of-scope example cannot be in scope too"
    )
    with pytest.raises(FactoryError, match="between 0 and 1"):
        load_labelled(train, val_share=1.0)


def test_the_cli_refuses_bad_data_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    data = bad(tmp_path, "two.csv", b"text,intent\nhello,greet\nhello,bye\n")
    artifacts, model = tmp_path / "artifacts", tmp_path / "model"
    flags = ["--artifacts", str(artifacts), "--model-dir", str(model)]
    result = run_cli("all", "--data", str(data), *flags, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {data}, line 3: the text 'hello' is 'bye' here and 'greet' on line 2"
    assert not artifacts.exists()
    assert not model.exists()
    clinc_with_val = run_cli("teacher", "--data", str(ROOT / "x.json"), "--val-data", str(data), *flags, timeout=120)
    assert clinc_with_val.returncode == 2
    assert (
        clinc_with_val.stderr.strip()
        == f"error: --val-data: only with CSV or JSONL data; {ROOT / 'x.json'} has its own"
    )


def test_texts_share_a_key_exactly_when_the_served_tokenizer_gives_them_the_same_ids(data_path: Path) -> None:
    """`text_key` stands in for the tokenizer, which the data check runs before: on every CLINC150 train and val
    text and their variants (case, accents, spacing around punctuation), one key is one sequence of token ids,
    and one sequence of ids is one key."""
    from tokenizers import Tokenizer

    from compression.labelled import text_key

    tokenizer = Tokenizer.from_file(str(Path(__file__).resolve().parents[1] / "models" / "clinc150" / "tokenizer.json"))
    raw = json.loads(data_path.read_text())
    texts = [text for split in ("train", "val", "oos_train", "oos_val") for text, _ in raw[split]]
    texts += [t.upper() for t in texts[:2000]] + [t.replace("'", " ' ") for t in texts if "'" in t]
    texts += ["Résumé help", "resume help", "naïve  café", "naive cafe", "what's up?", "what ' s up ?", "a_b", "a _ b"]
    by_key: dict[str, tuple[int, ...]] = {}
    by_ids: dict[tuple[int, ...], str] = {}
    for text in texts:
        ids = tuple(tokenizer.encode(text, add_special_tokens=False).ids)
        key = text_key(text)
        assert by_key.setdefault(key, ids) == ids, text
        assert by_ids.setdefault(ids, key) == key, text
    assert text_key("Résumé help") == text_key("resume help")
    assert text_key("what's up?") == text_key("what ' s up ?")
