"""The factory's one error type: anything a user can fix, reported as one line."""


class FactoryError(Exception):
    """A problem with the user's inputs (files, data, checkpoints), not a bug."""
