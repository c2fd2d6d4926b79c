"""The Rust tokenizer, as the engine runs it: no padding (each text is its own batch of one) and truncation at
the model's window."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from app.engine.errors import ModelLoadError


def open_tokenizer(path: Path, default_window: int) -> Tokenizer:
    """`default_window` applies only where the file sets no truncation of its own."""
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - the Rust library raises plain Exception on any parse error
        raise ModelLoadError(f"unreadable {path.name}: {str(exc).splitlines()[0][:200]}") from None
    tokenizer.no_padding()
    if not tokenizer.truncation:
        tokenizer.enable_truncation(max_length=default_window)
    return tokenizer
