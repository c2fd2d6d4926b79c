"""Property tests: the normaliser and the tokenizer take any Unicode without failing or growing the text."""

from __future__ import annotations

import unicodedata

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from app.config import Settings
from app.http.main import create_app
from app.http.normalize import normalize_text
from tests.conftest import MODEL_DIR
from tests.fakes import FakeClassifier, fake_factory

ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff"
RTL = "\u202e\u202b\u200f"
TOKENIZER = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
WINDOW = TOKENIZER.truncation["max_length"] if TOKENIZER.truncation else 512

texts = st.text(
    alphabet=st.one_of(
        st.characters(),
        st.sampled_from(list(ZERO_WIDTH + RTL + "\t\n\r\x00\x07\x1b")),
        st.sampled_from(list("مرحبا שלום 你好 🙂👍🏽 é e\u0301")),
    ),
    max_size=400,
)


@settings(max_examples=300, deadline=None)
@given(texts)
def test_normalize_is_idempotent_and_clean(text: str) -> None:
    out = normalize_text(text)
    assert normalize_text(out) == out
    assert out == out.strip()
    assert "  " not in out
    for ch in out:
        assert ch == " " or not ch.isspace()
        assert unicodedata.category(ch) not in {"Cc", "Cf", "Cs", "Co", "Cn"}


@settings(max_examples=300, deadline=None)
@given(texts)
def test_normalize_never_lengthens_beyond_nfc(text: str) -> None:
    assert len(normalize_text(text)) <= len(unicodedata.normalize("NFC", text))


def test_zero_width_and_bidi_only_text_is_empty() -> None:
    assert normalize_text(ZERO_WIDTH + RTL + " \t\n") == ""


def test_zero_width_characters_do_not_split_words() -> None:
    assert normalize_text("tr\u200bans\u200dfer") == "transfer"


@settings(max_examples=300, deadline=None)
@given(texts)
def test_tokenizer_output_is_bounded_and_well_formed(text: str) -> None:
    enc = TOKENIZER.encode(normalize_text(text) or "x")
    assert 2 <= len(enc.ids) <= WINDOW
    assert enc.ids[0] == TOKENIZER.token_to_id("[CLS]")
    assert enc.ids[-1] == TOKENIZER.token_to_id("[SEP]")
    assert all(0 <= i < TOKENIZER.get_vocab_size() for i in enc.ids)


@given(st.integers(min_value=1, max_value=5000))
def test_one_very_long_token_is_truncated(n: int) -> None:
    enc = TOKENIZER.encode("a" * n)
    assert len(enc.ids) <= WINDOW


@pytest.mark.parametrize("text", ["\u0301", "\ufe0f", "\u064b", "\u302a", "\u093e", "\ufffd", " \u0301 \ufffd\u20dd "])
def test_marks_or_replacement_characters_alone_are_empty(text: str) -> None:
    """With no letter to sit on, the tokenizer reads nothing of them, or [UNK]; the model answered an intent."""
    assert normalize_text(text) == ""


@pytest.mark.parametrize(
    ("text", "expected"), [("e\u0301", "\u00e9"), ("\u0301abc", "\u0301abc"), ("a \ufffd", "a \ufffd")]
)
def test_marks_with_something_to_read_stay(text: str, expected: str) -> None:
    assert normalize_text(text) == expected


def test_the_api_refuses_a_text_of_marks_alone_as_empty() -> None:
    with TestClient(create_app(Settings(warmup_queries=0), fake_factory(FakeClassifier()))) as client:
        for body in ({"text": "\u0301"}, {"texts": ["book a flight", "\ufe0f\ufe0f"]}):
            path = "/predict" if "text" in body else "/predict/batch"
            r = client.post(path, json=body)
            assert (r.status_code, r.json()["error"]["type"]) == (422, "empty_text"), r.text
