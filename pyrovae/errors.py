"""User-facing errors.

Every mistake a *user* can make (bad config, bad data, missing files, untrusted checkpoints)
raises a subclass of `PyroVAEError` whose message names the field or file, the expected
value and the actual value. The CLI prints these as one line and exits non-zero; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


class PyroVAEError(Exception):
    """Base class of all errors caused by user input (not by bugs in pyrovae)."""


class ConfigError(PyroVAEError, ValueError):
    """The configuration is invalid: an unknown key or kind, a wrong type, a value out of range."""


class DataError(PyroVAEError, ValueError):
    """The data is unusable: missing/corrupt files, NaN/inf, wrong shape, outside a likelihood's support."""


class CheckpointError(PyroVAEError):
    """A run folder or checkpoint is missing, incomplete, corrupt, or not safe to load."""


class TrainingError(PyroVAEError):
    """Training cannot continue (e.g. the loss stayed non-finite after the allowed retries)."""
