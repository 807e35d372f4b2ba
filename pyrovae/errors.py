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


class RunLockedError(PyroVAEError):
    """Another process is writing the run folder (it holds the folder's `.lock`)."""


class RunWriteError(OSError):
    """Writing a run folder's file failed (disk full, permission denied, ...).

    An `OSError` (the CLI exits with status 1, as for other file-system errors), whose message
    names the file being written and the last complete checkpoint that `fit --resume` will use,
    or says that none exists.
    """

    def __init__(self, message: str, errno: int | None, strerror: str | None, filename: str) -> None:
        super().__init__(errno, strerror, filename)
        self.message = message

    def __str__(self) -> str:
        return self.message
