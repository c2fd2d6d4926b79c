"""Text clean-up before tokenisation: Unicode NFC, no control or zero-width characters, single spaces."""

from __future__ import annotations

import re
import unicodedata

# Categories dropped outright: control, format (zero-width joiners, bidi marks), unassigned, private, surrogates.
_DROP = {"Cc", "Cf", "Cn", "Co", "Cs"}
_SPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    if not text.isprintable():
        text = "".join(
            " " if ch.isspace() else ch for ch in text if ch.isspace() or unicodedata.category(ch) not in _DROP
        )
    return _SPACE.sub(" ", text).strip()
