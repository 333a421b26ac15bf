"""Typed errors shared by the services and translated by each front end.

Every message says what went wrong and how to fix it, in plain language, so a
front end can show it as it is.
"""


class AppError(Exception):
    """Base class: a problem the user can understand and act on."""


class BadInputError(AppError):
    """The request itself is wrong: empty, too large, out of range."""


class TooLargeError(BadInputError):
    """The request is larger than the configured limit."""


class ConfigError(AppError):
    """config.yaml (or an environment override) has an unknown key or a bad value."""


class ModelMissingError(AppError):
    """The model's files are not where the configuration says."""


class ModelLoadError(AppError):
    """The model's files are there but could not be loaded (corrupt, wrong format)."""


class ModelTooLargeError(AppError):
    """The model cannot fit the memory budget, even with everything else evicted."""

    def __init__(self, message: str, needed_bytes: int, budget_bytes: int) -> None:
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.budget_bytes = budget_bytes


class OutOfMemoryError(AppError):
    """The device ran out of memory while loading or running a model."""


class BusyError(AppError):
    """Every model that could serve the request is in use; try again shortly."""


class RequestCancelledError(AppError):
    """The request was cancelled (Stop pressed, client gone) before it got its model."""
