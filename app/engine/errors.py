"""The engine's one failure kind."""

from __future__ import annotations


class ModelLoadError(Exception):
    """An artifact that cannot be served (missing or tampered file, a spec that does not validate, outputs that
    do not match the labels): raised before any traffic reaches it, with one line that says what is wrong."""
