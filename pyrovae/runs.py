"""Run folders: their layout, atomic code-free persistence, and loading a run back.

A run folder:

```text
config.toml                    the resolved, validated config
checkpoint.json                every non-tensor entry of the checkpoint (epoch, step, learning
                               rate, retries, history, config, kind, data shape and fingerprint,
                               plugin origins, library versions) and the name and size of its
                               tensors file
checkpoint-NNNNNN.safetensors  the tensors: model parameters, optimizer state, epoch order,
                               RNG states (generation NNNNNN; one file, the one checkpoint.json
                               names, outside a write)
metrics.json                   per-epoch train/val ELBO (nats per datapoint), epoch seconds;
                               final test metrics
figures/                       reconstructions, samples, latent scatter, loss curves
tb/                            TensorBoard event files (`train.log = true`, the default)
.lock                          exists while `fit` writes the folder: an OS lock (`flock`), the
                               holder's pid
```

* Nothing in a run folder is a pickle: tensors are `safetensors` (a JSON header and raw bytes),
  everything else is JSON or TOML, so any tool reads them and loading executes no code.
* A checkpoint is written as a set (`save_checkpoint`): the tensors go to a *new* file
  `checkpoint-<generation+1>.safetensors`, then `checkpoint.json` is atomically replaced (it
  names that file), then the older tensors file is deleted. A crash at any moment leaves the
  previous complete set or the new one, never a mix (each generation has its own file name).
  `checkpoint.json` records the tensors file's size; `load_checkpoint` checks it, and
  safetensors checks the header (offsets, dtypes, shapes) against the bytes. As with
  `torch.save`, no checksum covers the tensor bytes themselves (see docs/reliability.md).
* `fit` holds an exclusive OS lock on `.lock` (`RunLock`) for as long as it writes the folder,
  taken before it writes anything there; a second `fit` on the same folder is refused
  (`RunLockedError`, naming the holder's pid) and leaves the folder untouched. The OS releases
  the lock when its holder dies (even by SIGKILL), so a `.lock` left behind never blocks.
* The checkpoint stores a fingerprint of the data it was trained on (`pyrovae.data.fingerprint`:
  shape, dtype and SHA-256 of every split); `fit --resume` and `load_run(data=True)` refuse data
  that differ from it (`DataError`) unless told to accept the change.
* Every file is written to a temporary file in the same folder, flushed, fsync'ed and renamed
  over the target (then the folder is fsync'ed), so a crash at any moment leaves either the old
  or the new file, never half of one. A crash can leave the temporary file behind
  (`.checkpoint.json.XXXX.tmp`) or an orphan tensors file; `remove_stale_temp_files` deletes
  those on resume.
* The config is stored as data (a dict) and re-validated on load; `load_checkpoint` also checks
  that every entry the trainer needs is present and has the right type, so a corrupt or
  hand-made checkpoint is a `CheckpointError` naming the file, never a crash deeper in.
* Run folders of older pyrovae versions hold a pickled `checkpoint.pt`; loading one is refused
  with the command that converts it in place, `pyrovae migrate RUN` (`migrate_run`), which reads
  it with `torch.load(..., weights_only=True)` (no code is executed).
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no run-folder locks
    fcntl = None  # type: ignore[assignment]

from pyrovae.autoencoder import AutoEncoder
from pyrovae.build import build_model, check_data_for_model
from pyrovae.config import Config, load_config, plugins_used
from pyrovae.data import Dataset, data_changes, fingerprint, load_data
from pyrovae.errors import CheckpointError, ConfigError, DataError, PyroVAEError, RunLockedError
from pyrovae.model import VAE

#: the checkpoint's JSON file (non-tensor state; names the .safetensors file of its tensors)
CHECKPOINT = "checkpoint.json"
#: the pickled checkpoint of pyrovae run folders before format 2 (`pyrovae migrate` converts)
LEGACY_CHECKPOINT = "checkpoint.pt"
LEGACY_FORMAT_VERSION = 1
#: largest checkpoint.json read (guards against absurd files; a long history is ~1 kB/epoch)
MAX_MANIFEST_BYTES = 256 * 2**20
CONFIG = "config.toml"
METRICS = "metrics.json"
LOCK = ".lock"
#: what the numbers in metrics.json are
UNITS = (
    "nats per datapoint; *_elbo are ELBO estimates (1 sample per datapoint), higher is better; "
    "*_loss (AE) are reconstruction losses, lower is better"
)
FORMAT_VERSION = 2

#: largest number of values per datapoint a checkpoint may declare (guards against absurd
#: `data_shape` entries in untrusted files that would allocate huge networks)
MAX_DATA_DIM = 2**28


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort: not every platform allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_with(path: Path, write: Callable[[str], None]) -> None:
    """Atomically create `path` with `write(tmp)`, which writes a temporary file in the same
    folder: the file is then fsync'ed, renamed over `path`, and the folder fsync'ed. On any
    error the temporary file is deleted and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.close(fd)
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file + fsync + rename + fsync of the folder)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write_with(path, write)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, allow_nan=True) + "\n").encode())


class RunLock:
    """An exclusive OS lock on a run folder (`fcntl.flock` on `folder/.lock`), held by `fit`.

    `acquire` creates `.lock` if needed, locks it without waiting and writes the holder's pid
    in it; if another process holds it, `RunLockedError` names the folder and that pid, and
    nothing in the folder is changed. `release` deletes `.lock` and unlocks it. The OS drops
    the lock when the holder dies (SIGKILL included), so a stale `.lock` never blocks: the next
    `acquire` takes it over. Use as a context manager. On platforms without `fcntl` it does
    nothing.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.fd: int | None = None

    def _refuse(self, fd: int) -> RunLockedError:
        try:
            pid = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
        except OSError:
            pid = "unknown"
        return RunLockedError(
            f"{self.folder} is in use by another pyrovae process (pid {pid}, holding "
            f"{self.path}); expected no other writer. Wait for it to finish, or stop it "
            "(its last complete checkpoint stays valid), then run the command again"
        )

    def acquire(self) -> RunLock:
        """Take the lock (the folder must exist); `RunLockedError` if another process holds it."""
        if fcntl is None or self.fd is not None:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                err = self._refuse(fd)
                os.close(fd)
                raise err from None
            except BaseException:
                os.close(fd)
                raise
            try:  # the holder we waited on may have deleted the file: lock the one in place
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
            time.sleep(0.001)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        """Delete `.lock` and drop the lock (delete first: nobody can lock a deleted file)."""
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete temporary files a killed process left in a run folder; return what was removed.

    Only names this module (`.NAME.XXXX.tmp`, tensors files `checkpoint-*.safetensors` that
    checkpoint.json does not name) and `pyrovae.plots` (`.NAME.tmp.png` in `figures/`) create
    are touched.
    """
    folder = Path(folder)
    stale = [*folder.glob(".*.tmp"), *(folder / "figures").glob(".*.tmp.png")]
    removed = remove_orphan_tensor_files(folder)
    for p in stale:
        if p.is_file():
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed


def _versions() -> dict[str, str]:
    """Versions of the libraries that wrote a checkpoint (stored beside it, for the reader)."""
    import platform

    import pyro
    import safetensors

    import pyrovae

    return {
        "pyrovae": pyrovae.__version__,
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def split_tensors(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`obj` with every tensor moved into `tensors` (under a dotted name) and replaced by
    `{"__tensor__": name}`: what is left is plain JSON data.

    Nested dicts and lists (an optimizer's `state_dict()`, a history) are walked; tuples become
    lists; a dict whose keys are not all strings (an optimizer's per-parameter `state`, keyed by
    int) is stored as `{"__items__": [[key, value], ...]}`. Anything else (a Python object, a
    function) is a `TypeError` naming where it sits: a run folder holds no pickle.
    """
    if isinstance(obj, torch.Tensor):
        name = key
        while name in tensors:
            name += "'"
        tensors[name] = obj.detach().to("cpu")
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: split_tensors(v, f"{key}.{k}", tensors) for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"{key}: cannot store the dict key {k!r} in a run folder")
            items.append([k, split_tensors(v, f"{key}.{k}", tensors)])
        return {"__items__": items}
    if isinstance(obj, (list, tuple)):
        return [split_tensors(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(
        f"{key}: cannot store a {type(obj).__name__} in a run folder (tensors, numbers, "
        "strings, lists and dicts only)"
    )


def _own_storage(tensors: dict[str, torch.Tensor]) -> None:
    """Copy the tensors safetensors cannot write as they are: non-contiguous ones, views into a
    larger storage, and tensors sharing storage (tied weights); the rest are written as is."""
    seen: set[int] = set()
    for k, t in tensors.items():
        storage = t.untyped_storage()
        if t.numel() and (
            not t.is_contiguous()
            or storage.data_ptr() in seen
            or t.storage_offset() != 0
            or storage.nbytes() != t.numel() * t.element_size()
        ):
            tensors[k] = t = t.clone(memory_format=torch.contiguous_format)
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor], used: set[str], path: Path, key: str) -> Any:
    """The inverse of `split_tensors`; `CheckpointError` naming `path` and the entry for a
    placeholder that names no tensor or a malformed `__items__` list."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            name = obj["__tensor__"]
            if len(obj) != 1 or not isinstance(name, str) or name not in tensors:
                raise CheckpointError(
                    f"{path}: entry {key!r}: expected a tensor stored in the .safetensors file, "
                    f"got a reference to {name!r:.80} which it does not hold"
                )
            used.add(name)
            return tensors[name]
        if "__items__" in obj:
            items = obj["__items__"]
            if len(obj) != 1 or not isinstance(items, list) or not all(
                isinstance(i, list) and len(i) == 2 and isinstance(i[0], (str, int)) for i in items
            ):
                raise CheckpointError(
                    f"{path}: entry {key!r}: expected a list of [key, value] pairs, got {items!r:.80}"
                )
            return {k: join_tensors(v, tensors, used, path, f"{key}.{k}") for k, v in items}
        return {k: join_tensors(v, tensors, used, path, f"{key}.{k}") for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors, used, path, f"{key}.{i}") for i, v in enumerate(obj)]
    return obj


#: entries of checkpoint.json that describe the file, not the trainer's state
_META = ("format", "format_version", "generation", "tensors", "versions")
_ST_META = {"format": "pyrovae run checkpoint"}
_TENSOR_FILE = re.compile(r"checkpoint-(\d{6,})\.safetensors")


def tensor_file_name(generation: int) -> str:
    """The name of the tensors file of checkpoint generation `generation`."""
    return f"checkpoint-{generation:06d}.safetensors"


def _current_generation(folder: Path) -> int:
    """The highest generation named by checkpoint.json or found on disk (0 if none)."""
    gens = [int(m[1]) for p in folder.glob("checkpoint-*.safetensors") if (m := _TENSOR_FILE.fullmatch(p.name))]
    try:
        g = json.loads((folder / CHECKPOINT).read_text()).get("generation")
        if _is_int(g):
            gens.append(g)
    except (OSError, ValueError, AttributeError):
        pass
    return max(gens, default=0)


def referenced_tensor_file(folder: Path) -> str | None:
    """The tensors file checkpoint.json names (None if it is missing or unreadable)."""
    try:
        name = json.loads((Path(folder) / CHECKPOINT).read_text())["tensors"]["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and _TENSOR_FILE.fullmatch(name) else None


def remove_orphan_tensor_files(folder: Path) -> list[Path]:
    """Delete `checkpoint-*.safetensors` files that checkpoint.json does not name (older
    generations, or a newer one whose checkpoint.json a crash never wrote). Nothing is deleted
    when checkpoint.json is missing or unreadable."""
    folder = Path(folder)
    keep = referenced_tensor_file(folder)
    if keep is None:
        return []
    removed = []
    for p in folder.glob("checkpoint-*.safetensors"):
        if p.name != keep and _TENSOR_FILE.fullmatch(p.name):
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    if removed:
        _fsync_dir(folder)
    return removed


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` (tensors, numbers, strings, lists, dicts) as a checkpoint set, atomically.

    `path` is the checkpoint's JSON file (`RUN/checkpoint.json`). The tensors go to a new file
    `checkpoint-<generation>.safetensors` beside it (`safetensors.torch.save_file` into a
    temporary file, then fsync and rename: `atomic_write_with`), then `path` (every non-tensor entry, the tensors file's name, size
    and the library versions) is atomically replaced, then older tensors files are
    deleted. The JSON file is the switch: a crash before its rename leaves the previous set
    complete and loadable (the new tensors file is an orphan, deleted by the next save or
    resume), a crash after it leaves the new set.
    """
    from safetensors.torch import save_file

    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    body = {k: split_tensors(v, k, tensors) for k, v in state.items() if k not in _META}
    _own_storage(tensors)
    generation = _current_generation(folder) + 1
    name = tensor_file_name(generation)
    atomic_write_with(folder / name, lambda tmp: save_file(tensors, tmp, metadata=_ST_META))
    manifest = {
        "format": "pyrovae run checkpoint",
        "format_version": FORMAT_VERSION,
        "generation": generation,
        "tensors": {
            "file": name,
            "bytes": (folder / name).stat().st_size,
        },
        "versions": _versions(),
        **body,
    }
    atomic_write_json(path, manifest)
    remove_orphan_tensor_files(folder)


def _read_set(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """Read checkpoint.json and the tensors file it names; `CheckpointError` naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        text = path.read_bytes()
    except IsADirectoryError:
        raise CheckpointError(f"{path}: expected a checkpoint file, got a folder or special file") from None
    if len(text) > MAX_MANIFEST_BYTES:
        raise CheckpointError(
            f"{path}: expected a checkpoint JSON file of at most {MAX_MANIFEST_BYTES} bytes, "
            f"got {len(text)}"
        )
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{path}: refused to load: not valid JSON, the file is truncated or corrupt ({first_lines(e, 1, 120)})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        got = manifest.get("format_version") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(
            f"{path}: unsupported checkpoint format: expected format_version "
            f"{FORMAT_VERSION}, got {got!r}"
        )
    meta = manifest.get("tensors")
    if not (
        isinstance(meta, dict)
        and isinstance(meta.get("file"), str)
        and _TENSOR_FILE.fullmatch(meta["file"])
        and _is_int(meta.get("bytes"))
    ):
        raise CheckpointError(
            f"{path}: entry 'tensors': expected {{file: 'checkpoint-NNNNNN.safetensors' (in the "
            f"same folder), bytes}}, got {meta!r:.120}"
        )
    tpath = path.parent / meta["file"]
    try:
        size = tpath.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(
            f"{tpath}: missing: {path} names it as its tensors file; expected both files of the "
            "checkpoint (copy the whole run folder)"
        ) from None
    if size != meta["bytes"]:
        raise CheckpointError(
            f"{tpath}: refused to load: expected {meta['bytes']} bytes (as {path.name} says), got "
            f"{size}: the file is truncated or corrupt"
        )
    try:
        tensors = load_file(tpath)
    except (SafetensorError, ValueError, TypeError, RuntimeError, OverflowError) as e:
        raise CheckpointError(
            f"{tpath}: refused to load: not a valid safetensors file ({first_lines(e, 1, 160)})"
        ) from None
    return manifest, tensors, tpath


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint set without executing code; raise `CheckpointError` on any problem.

    `path` is the checkpoint's JSON file; the tensors come from the `.safetensors` file it
    names (each save writes a new file name, so a JSON file and a tensors file from different
    saves never mix), checked against the size it records. No pickle is read. `check_state` then validates the
    entries. A checkpoint.pt of an older pyrovae is refused with the command that converts it
    (`pyrovae migrate RUN`).
    """
    path = Path(path)
    if not path.exists():
        legacy = path.parent / LEGACY_CHECKPOINT
        if legacy.is_file():
            raise CheckpointError(migration_message(path.parent))
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{path}: expected a checkpoint file, got a folder or special file")
    for attempt in range(3):  # a concurrent save may replace the set between the two reads
        try:
            manifest, tensors, tpath = _read_set(path)
            break
        except CheckpointError:
            if attempt == 2 or referenced_tensor_file(path.parent) is None:
                raise
            time.sleep(0.05)
    used: set[str] = set()
    state = {
        k: join_tensors(v, tensors, used, path, k) for k, v in manifest.items() if k not in _META
    }
    state["format_version"] = FORMAT_VERSION
    check_state(state, path)
    extra = sorted(set(tensors) - used)
    if extra:
        raise CheckpointError(
            f"{tpath}: holds tensors {', '.join(extra[:4])} that {path.name} does not name; "
            "expected the tensors of one checkpoint"
        )
    return state


def migration_message(folder: Path) -> str:
    """The one-line error for a run folder written by an older pyrovae (checkpoint.pt)."""
    import shlex

    return (
        f"{Path(folder) / LEGACY_CHECKPOINT}: a run folder of an older pyrovae (a pickled "
        f"torch checkpoint; this version reads {CHECKPOINT} + .safetensors, no pickle); convert "
        f"it once with: pyrovae migrate {shlex.quote(str(folder))}"
    )


def load_legacy_checkpoint(path: Path) -> dict[str, Any]:
    """Load an older pyrovae's `checkpoint.pt` without executing code (`torch.load` with
    `weights_only=True`, which refuses pickled classes and functions); only `migrate_run`
    reads these. `CheckpointError` on any problem."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{path}: expected a checkpoint file, got a folder or special file")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - anything torch raises here means "unsafe or corrupt"
        raise CheckpointError(_load_failure(path, e)) from None
    if not isinstance(state, dict) or state.get("format_version") != LEGACY_FORMAT_VERSION:
        got = state.get("format_version") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path}: unsupported checkpoint format: expected format_version "
            f"{LEGACY_FORMAT_VERSION}, got {got!r}"
        )
    check_state(state, path)
    return state


def _load_failure(path: Path, e: Exception) -> str:
    """A one-paragraph explanation of why `torch.load(weights_only=True)` refused `path`."""
    text = str(e)
    safe = (
        "It was read with torch.load(weights_only=True): nothing in it was executed. Do not "
        "load it with weights_only=False unless you trust its source."
    )
    glob = re.search(r"GLOBAL ([\w.]+)", text)
    if glob:
        return (
            f"{path}: refused to load: the file asks to import the Python object {glob[1]}, "
            f"which a pyrovae checkpoint never holds (only tensors and plain data). {safe}"
        )
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    detail = next((ln for ln in lines if ln.startswith("Unsupported")), None)
    detail = (detail or (lines[0] if lines else type(e).__name__))[:200]
    if isinstance(e, pickle.UnpicklingError):
        return (
            f"{path}: refused to load: not a pyrovae checkpoint: the file is truncated or corrupt, "
            f"or holds pickled Python objects beyond tensors and plain data ({detail}). {safe}"
        )
    return f"{path}: refused to load: the file is truncated or corrupt ({detail})"


def save_legacy_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write an older pyrovae's `checkpoint.pt` (`torch.save`): only for tests of `migrate`
    and for the benchmark that compares the two formats."""
    buf = io.BytesIO()
    torch.save({**state, "format_version": LEGACY_FORMAT_VERSION}, buf)
    atomic_write_bytes(path, buf.getvalue())


def migrate_run(folder: str | Path) -> tuple[Path, bool]:
    """Convert a run folder of an older pyrovae (`checkpoint.pt`) to the current format, in
    place; return (checkpoint.json, whether anything was converted).

    Under the folder's lock: the old checkpoint is read with `weights_only=True` and checked
    as any checkpoint, the new set is written (`save_checkpoint`: tensors file, then
    checkpoint.json, each atomically), and only then is `checkpoint.pt` deleted. A crash at
    any moment leaves a loadable folder: before checkpoint.json exists, the old file is
    untouched (and `migrate` can run again); after, checkpoint.json is complete and the next
    `migrate` just deletes the old file. config.toml, metrics.json and figures are kept.
    """
    d = Path(folder)
    if not d.is_dir():
        raise CheckpointError(f"run folder not found: {d}")
    legacy, new = d / LEGACY_CHECKPOINT, d / CHECKPOINT
    with RunLock(d):
        if not legacy.exists():
            if new.is_file():
                load_checkpoint(new)  # already current: check it loads
                return new, False
            raise CheckpointError(
                f"{d}: holds neither {CHECKPOINT} nor {LEGACY_CHECKPOINT}; expected a run folder "
                "written by pyrovae fit"
            )
        if not new.is_file():
            state = load_legacy_checkpoint(legacy)
            state.pop("format_version", None)
            save_checkpoint(new, state)
        load_checkpoint(new)
        legacy.unlink()
        _fsync_dir(d)
    return new, True


def _is_int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _tensor_dict(v: Any) -> bool:
    return isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items()
    )


#: entry -> (check, what it must be), for every entry the trainer and `load_run` read
_ENTRIES: dict[str, tuple[Any, str]] = {
    "kind": (lambda v: isinstance(v, str) and 0 < len(v) <= 300, "'vae', 'ae' or a plugin model"),
    "config": (lambda v: isinstance(v, dict), "a table (the run's config)"),
    "data_shape": (
        lambda v: (
            isinstance(v, (list, tuple))
            and 0 < len(v) <= 8
            and all(_is_int(s, 1) for s in v)
            and math.prod(v) <= MAX_DATA_DIM
        ),
        f"a list of 1 to 8 positive integers with product <= {MAX_DATA_DIM}",
    ),
    "model": (_tensor_dict, "a dict of parameter name -> tensor"),
    "optimizer": (
        lambda v: isinstance(v, dict) and "state" in v and "param_groups" in v,
        "an optimizer state dict",
    ),
    "epoch": (_is_int, "an integer >= 0"),
    "step_in_epoch": (_is_int, "an integer >= 0"),
    "perm": (
        lambda v: v is None or (isinstance(v, torch.Tensor) and v.dim() == 1),
        "None or a 1-D tensor",
    ),
    "torch_rng": (
        lambda v: isinstance(v, torch.Tensor) and v.dtype == torch.uint8,
        "a uint8 RNG-state tensor",
    ),
    "cuda_rng": (
        lambda v: v is None or (isinstance(v, torch.Tensor) and v.dtype == torch.uint8),
        "None or a uint8 RNG-state tensor",
    ),
    "batch_rng": (
        lambda v: isinstance(v, torch.Tensor) and v.dtype == torch.uint8,
        "a uint8 RNG-state tensor",
    ),
    "lr": (
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf,
        "a finite number > 0",
    ),
    "retries": (_is_int, "an integer >= 0"),
    "history": (
        lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v),
        "a list of per-epoch tables",
    ),
}


def _fingerprint_ok(fp: Any) -> bool:
    return isinstance(fp, dict) and all(
        isinstance(k, str)
        and isinstance(v, dict)
        and isinstance(v.get("shape"), list)
        and all(_is_int(n) for n in v["shape"])
        and isinstance(v.get("dtype"), str)
        and isinstance(v.get("sha256"), str)
        for k, v in fp.items()
    )


def check_state(state: dict[str, Any], path: Path) -> None:
    """Raise `CheckpointError` unless `state` has every entry, of the right type.

    Also refuses non-finite parameters: pyrovae never writes them (see `save_run_checkpoint`), so a
    checkpoint holding NaN/inf was damaged or made elsewhere.
    """
    missing = [k for k in _ENTRIES if k not in state]
    if missing:
        raise CheckpointError(
            f"{path}: incomplete checkpoint: expected the entries {', '.join(_ENTRIES)}; "
            f"missing {', '.join(missing)}"
        )
    for key, (ok, what) in _ENTRIES.items():
        value = state[key]
        if not ok(value):
            if isinstance(value, torch.Tensor):
                shown = f"a {value.dtype} tensor of shape {tuple(value.shape)}"
            elif isinstance(value, dict):
                shown = f"a dict with keys {list(value)[:6]}"
            else:
                shown = repr(value)
            raise CheckpointError(f"{path}: entry {key!r}: expected {what}, got {shown[:120]}")
    fp = state.get("data_fingerprint")
    if fp is not None and not _fingerprint_ok(fp):
        raise CheckpointError(
            f"{path}: entry 'data_fingerprint': expected a table of split -> {{shape, dtype, "
            f"sha256}}, got {fp!r:.120}"
        )
    plugins = state.get("plugins", [])
    if not (isinstance(plugins, list) and all(isinstance(x, dict) for x in plugins)):
        raise CheckpointError(f"{path}: entry 'plugins': expected a list of tables, got {plugins!r:.120}")
    for name, t in state["model"].items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(
                f"{path}: parameter {name!r} holds NaN/inf values; expected finite numbers "
                "(pyrovae never writes such a checkpoint: the file was damaged or made elsewhere)"
            )


# ------------------------------------------------------------------------------------ runs
@dataclass
class Run:
    """A trained (or loaded) run: its folder, config, network and metrics."""

    dir: Path
    config: Config
    model: VAE | AutoEncoder | torch.nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    data: Dataset | None = None
    interrupted: bool = False


def save_run_checkpoint(
    folder: Path,
    config: Config,
    data_shape: tuple[int, ...],
    trainer_state: dict[str, Any],
    data_fingerprint: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint set of `folder` (`checkpoint.json` + its `.safetensors` file, see
    `save_checkpoint`): the trainer's state (any `nn.Module`'s and any `torch.optim`
    optimizer's `state_dict()`, RNG states, position, history) plus what rebuilds the model,
    the plugins it uses, and the fingerprint of the data it is trained on
    (`pyrovae.data.fingerprint`) when given. Returns the path of `checkpoint.json`.

    Refuses (`TrainingError`) to write non-finite parameters, so the last checkpoint is always
    one to resume from.
    """
    from pyrovae.errors import TrainingError

    if not all(bool(torch.isfinite(t).all()) for t in trainer_state["model"].values()):
        raise TrainingError("refusing to write a checkpoint with non-finite parameters")
    path = Path(folder) / CHECKPOINT
    save_checkpoint(
        path,
        {
            "kind": config.model.kind,
            "config": config.to_dict(),
            "data_shape": list(data_shape),
            "plugins": plugins_used(config),
            **({"data_fingerprint": data_fingerprint} if data_fingerprint is not None else {}),
            **trainer_state,
        },
    )
    return path


def first_lines(e: BaseException, n: int = 2, limit: int = 300) -> str:
    """The first `n` non-empty lines of an exception's message, on one line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()][:n]
    return (" ".join(lines) or type(e).__name__)[:limit]


def stored_config(
    state: dict[str, Any], path: Path, accept_plugin_changes: bool = False
) -> Config:
    """The config a checkpoint holds, validated; `CheckpointError` naming `path` if not.

    The plugins it names are imported from the Python environment or the files loaded with
    `pyrovae.load_plugin` (never from the run folder), and each must have the source the run
    recorded (SHA-256), unless `accept_plugin_changes`.
    """
    recorded = state.get("plugins") or []
    try:
        cfg = load_config(state["config"])
    except ConfigError as e:
        if recorded:
            names = ", ".join(f"{p['kind']!r} ({p.get('file') or p.get('import')})" for p in recorded)
            raise CheckpointError(
                f"{path}: the run uses the plugin(s) {names}; load them first (--plugin FILE, "
                f"or install the package): {' '.join(str(e).split())}"
            ) from None
        raise CheckpointError(
            f"{path}: the config stored in the checkpoint is invalid: {' '.join(str(e).split())}"
        ) from None
    now = {p["key"]: p for p in plugins_used(cfg)}
    for p in recorded:
        cur = now.get(p.get("key"), {})
        if p.get("sha256") and cur.get("sha256") != p["sha256"] and not accept_plugin_changes:
            raise CheckpointError(
                f"{path}: the plugin {p['kind']!r} ({p['key']}) changed since the run was "
                f"trained: source SHA-256 {str(p['sha256'])[:12]} then, "
                f"{str(cur.get('sha256'))[:12]} now ({cur.get('file') or p.get('file')}); pass "
                "--accept-plugin-changes (accept_plugin_changes=True) to load it anyway"
            )
    if cfg.model.kind != state["kind"]:
        raise CheckpointError(
            f"{path}: entry 'kind' is {state['kind']!r} but the stored config says "
            f"model.kind = {cfg.model.kind!r}; expected the same"
        )
    return cfg


def check_data_fingerprint(
    state: dict[str, Any],
    data: Dataset,
    source: str,
    path: Path,
    accept_data_changes: bool = False,
) -> dict[str, Any]:
    """Compare `data` with the fingerprint a checkpoint `state` holds; return `data`'s.

    `DataError` naming `source` (e.g. `data.dataset='x.npy'`) and what changed (shape, dtype or
    content of which split) unless `accept_data_changes`. Checkpoints written before
    fingerprints existed have none: nothing is compared.
    """
    now = fingerprint(data)
    then = state.get("data_fingerprint")
    if then is None or accept_data_changes:
        return now
    changes = data_changes(then, now)
    if changes:
        raise DataError(
            f"{source}: the data changed since the run in {path.parent} was trained: "
            f"{'; '.join(changes)} (expected the fingerprint stored in {path}). Restore the "
            "data, or pass --accept-data-changes (accept_data_changes=True) to use it anyway"
        )
    return now


def load_run(
    run_dir: str | Path,
    data: bool = False,
    accept_plugin_changes: bool = False,
    accept_data_changes: bool = False,
) -> Run:
    """Load a run folder (checkpoint.json + .safetensors: no pickle, no code is executed).

    With `data=True` the dataset of the stored config is loaded too and checked against the
    model (point shape, likelihood support) and against the data fingerprint the checkpoint
    holds (`check_data_fingerprint`): data that changed since training (shape, dtype or content
    of any split) are refused unless `accept_data_changes`. Every problem is a
    `CheckpointError` or a `DataError` naming the file; a folder of an older pyrovae
    (`checkpoint.pt`) is a `CheckpointError` naming `pyrovae migrate RUN`.
    """
    d = Path(run_dir)
    if not d.is_dir():
        raise CheckpointError(f"run folder not found: {d}")
    path = d / CHECKPOINT
    state = load_checkpoint(path)
    cfg = stored_config(state, path, accept_plugin_changes)
    shape = tuple(state["data_shape"])
    try:
        model = build_model(cfg, shape)
    except PyroVAEError as e:
        raise CheckpointError(
            f"{path}: the stored config cannot build a model for data of shape {shape}: {e}"
        ) from None
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: parameters do not match the stored config: {first_lines(e)}"
        ) from None
    model.eval()
    metrics: dict[str, Any] = {}
    if (d / METRICS).is_file():
        try:
            metrics = json.loads((d / METRICS).read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{d / METRICS}: not valid JSON ({e})") from None
    ds = None
    if data:
        ds = load_data(cfg.data, seed=cfg.train.seed)
        source = f"data.dataset={cfg.data.dataset!r}"
        check_data_for_model(model, ds, f"{source} (the run {d})")
        check_data_fingerprint(state, ds, source, path, accept_data_changes)
    return Run(
        dir=d, config=cfg, model=model, history=list(state["history"]), metrics=metrics, data=ds
    )
