"""Errors a user can cause. Every one says what was wrong and what to do about it.

The CLI prints the message and exits 2 (never a traceback); the server maps them to 4xx.
Programming errors stay ordinary exceptions.
"""


class LlmosError(Exception):
    """Base class for errors caused by user input, files or configuration."""


class ModelLoadError(LlmosError):
    """A model directory is missing, incomplete, corrupt, or does not match its config."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint's architecture (or one of its options) is not supported by llmos."""


class InvalidRequestError(LlmosError):
    """A request's prompt or sampling parameters are invalid (e.g. temperature < 0)."""


class ProcessNotFoundError(LlmosError):
    """No process with the given pid exists (or it belongs to someone else)."""


class OutOfBlocksError(LlmosError):
    """The request can never fit in the KV pool, even if it ran alone."""


class DataError(LlmosError):
    """Training data is missing, empty, binary or malformed."""


class TrainingDivergedError(LlmosError):
    """The training loss became NaN or infinite; nothing was saved."""


class HibernationError(LlmosError):
    """A hibernation image is missing, truncated, corrupt, or belongs to another model."""


class QuotaExceededError(LlmosError):
    """An owner is at one of their limits (live processes, KV blocks); wait, or end one of their processes."""
