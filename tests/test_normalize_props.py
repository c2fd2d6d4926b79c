"""Property tests: the normaliser and the tokenizer take any Unicode without failing or growing the text."""

from __future__ import annotations

import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from app.http.normalize import normalize_text
from tests.conftest import MODEL_DIR

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
