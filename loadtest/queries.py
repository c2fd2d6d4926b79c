"""Queries to send: CLINC150 validation texts from a configurable path, or a small built-in set."""

from __future__ import annotations

import json
import os
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared/data/clinc150/clinc150_plus_train_val.json"
BUILTIN = [
    "Hey, I'd like to rent a vehicle from Nov 1st to Nov 15th in Paris",
    "what's the balance on my checking account",
    "please freeze my visa card, it was stolen",
    "how do you say thank you in japanese",
    "book a table for four at an italian place tonight",
    "what's the weather going to be like tomorrow",
    "set an alarm for 6am",
    "how many calories are in a banana",
    "who won the world cup in 1998",
    "play some jazz",
    "transfer $200 from savings to checking",
    "is my flight to boston on time",
]


class QueryError(ValueError):
    """An explicitly given query file that cannot be read or holds no CLINC150 validation texts."""


def read_queries(path: str | os.PathLike[str] | None = None) -> tuple[list[str], str]:
    """The texts to send and where they came from (a path, or "built-in"). A path given (`path`, LOADTEST_DATA) that
    cannot be read or parsed is an error: a typo had silently sent the 12 built-in sentences. Only the default path,
    where ../shared is absent, falls back to them."""
    given = path or os.environ.get("LOADTEST_DATA", "")
    source = Path(given or DEFAULT_DATA)
    if not given and not source.exists():
        return list(BUILTIN), "built-in"
    try:
        raw = json.loads(source.read_text(encoding="utf-8"))
        texts = [row[0] for row in raw["val"] + raw["oos_val"]]
    except OSError as exc:
        raise QueryError(f"cannot read queries from {source}: {exc.strerror or exc}") from None
    except (KeyError, ValueError, TypeError, IndexError):
        raise QueryError(f"cannot read queries from {source}: not CLINC150 JSON with val and oos_val") from None
    if not texts or not all(isinstance(text, str) for text in texts):
        raise QueryError(f"cannot read queries from {source}: no validation texts")
    return texts, str(source)


def load_queries(path: str | os.PathLike[str] | None = None) -> list[str]:
    return read_queries(path)[0]
