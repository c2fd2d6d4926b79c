"""Text clean-up before tokenisation: Unicode NFC, no control or zero-width characters, single spaces."""

from __future__ import annotations

import re
import unicodedata

# Categories dropped outright: control, format (zero-width joiners, bidi marks), unassigned, private, surrogates.
_DROP = {"Cc", "Cf", "Cn", "Co", "Cs"}
_SPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """The text as the tokenizer gets it; empty when nothing in it can be read."""
    text = unicodedata.normalize("NFC", text)
    if not text.isprintable():
        text = "".join(
            " " if ch.isspace() else ch for ch in text if ch.isspace() or unicodedata.category(ch) not in _DROP
        )
    text = _SPACE.sub(" ", text).strip()
    # Looked at only when the first character could start such a text: one category lookup for any other.
    if text and _unreadable(text[0]) and all(ch == " " or _unreadable(ch) for ch in text):
        return ""
    return text


def _unreadable(ch: str) -> bool:
    """A mark (an accent, a vowel sign, a variation selector), which reads only on a letter before it, or U+FFFD, the
    stand-in for bytes that were not text. A text of these alone has nothing to read: BERT's normaliser strips
    nearly all of them (1,566 of the 1,950 nonspacing marks, and U+FFFD), so the model was asked about an empty
    input and answered an intent (a lone U+0301 read `greeting`, 0.34)."""
    return ch == "\ufffd" or unicodedata.category(ch)[0] == "M"
