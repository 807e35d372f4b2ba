"""Atomic, code-free persistence of runs.

* Every file is written to a temporary file in the same folder, flushed, fsync'ed and renamed
  over the target, so a crash at any moment leaves either the old or the new file, never half.
* Checkpoints hold only tensors and plain data; they are read with
  ``torch.load(..., weights_only=True)``, which refuses pickled code. The config is stored as
  data (a dict) and re-validated on load.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from pyrovae.errors import CheckpointError

CHECKPOINT = "checkpoint.pt"
FORMAT_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, allow_nan=True) + "\n").encode())


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Serialize ``state`` (tensors, numbers, strings, lists, dicts) atomically."""
    buf = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint without executing code; raise :class:`CheckpointError` on any problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - anything torch raises here means "unsafe or corrupt"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused to load: not a valid pyrovae checkpoint, or it contains code/objects "
            f"that are not plain tensors and data (loaded with weights_only=True). Detail: {first}"
        ) from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        got = state.get("format_version") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: unsupported checkpoint format: expected format_version {FORMAT_VERSION}, got {got!r}")
    return state
