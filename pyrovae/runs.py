"""Run folders: their layout, atomic code-free persistence, and loading a run back.

A run folder:

```text
config.toml      the resolved, validated config
checkpoint.pt    model + optimizer + RNG state (`Trainer.state_dict()` plus the run's kind,
                 config and data shape), written atomically every epoch and on SIGINT/SIGTERM
metrics.json     per-epoch train/val ELBO (nats per datapoint), epoch seconds; final test metrics
figures/         reconstructions, samples, latent scatter, loss curves
.lock            exists while `fit` writes the folder: an OS lock (`flock`), the holder's pid
```

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
  (`.checkpoint.pt.XXXX.tmp`); `remove_stale_temp_files` deletes those on resume.
* Checkpoints hold only tensors and plain data; they are read with
  `torch.load(..., weights_only=True)`, which refuses pickled code. The config is stored as
  data (a dict) and re-validated on load; `load_checkpoint` also checks that every entry
  the trainer needs is present and has the right type, so a corrupt or hand-made checkpoint is
  a `CheckpointError` naming the file, never a crash deeper in.
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

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.toml"
METRICS = "metrics.json"
LOCK = ".lock"
#: what the numbers in metrics.json are
UNITS = (
    "nats per datapoint; *_elbo are ELBO estimates (1 sample per datapoint), higher is better; "
    "*_loss (AE) are reconstruction losses, lower is better"
)
FORMAT_VERSION = 1

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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file + fsync + rename + fsync of the folder)."""
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
    _fsync_dir(path.parent)


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

    Only names this module (`.NAME.XXXX.tmp`) and `pyrovae.plots` (`.NAME.tmp.png` in
    `figures/`) create are touched.
    """
    folder = Path(folder)
    stale = [*folder.glob(".*.tmp"), *(folder / "figures").glob(".*.tmp.png")]
    removed = []
    for p in stale:
        if p.is_file():
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Serialize `state` (tensors, numbers, strings, lists, dicts) atomically."""
    buf = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint without executing code; raise `CheckpointError` on any problem.

    The file is read with `weights_only=True` (pickled classes and functions are refused), its
    `format_version` must be `FORMAT_VERSION`, and `check_state` validates the
    entries.
    """
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
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        got = state.get("format_version") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path}: unsupported checkpoint format: expected format_version "
            f"{FORMAT_VERSION}, got {got!r}"
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
    """Write `folder/checkpoint.pt`: the trainer's state plus what rebuilds the model, and the
    fingerprint of the data it is trained on (`pyrovae.data.fingerprint`) when given.

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
            f"{path}: the config stored in the checkpoint is invalid: {e}"
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
    """Load a run folder (checkpoint read with `weights_only=True`: no code is executed).

    With `data=True` the dataset of the stored config is loaded too and checked against the
    model (point shape, likelihood support) and against the data fingerprint the checkpoint
    holds (`check_data_fingerprint`): data that changed since training (shape, dtype or content
    of any split) are refused unless `accept_data_changes`. Every problem is a
    `CheckpointError` or a `DataError` naming the file.
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
