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


def load_queries(path: str | None = None) -> list[str]:
    source = Path(path or os.environ.get("LOADTEST_DATA", "") or DEFAULT_DATA)
    try:
        raw = json.loads(source.read_text(encoding="utf-8"))
        texts = [row[0] for row in raw["val"] + raw["oos_val"]]
    except (OSError, KeyError, ValueError, TypeError, IndexError):
        return list(BUILTIN)
    return texts or list(BUILTIN)
