"""What the commands do: `fit` a run folder, `evaluate_run` it, `compare` a VAE with the AE.

The only module that brings together the trainer (`pyrovae.train`), the run folder
(`pyrovae.runs`), the estimators (`pyrovae.evaluate`) and the figures (`pyrovae.plots`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyro
import torch

from pyrovae import distributed, evaluate, plots
from pyrovae.build import (
    build_model,
    check_data_for_model,
    check_program,
    is_plugin_model,
    resolve_device,
)
from pyrovae.config import Config, load_config
from pyrovae.data import Dataset, fingerprint, load_data
from pyrovae.errors import CheckpointError, ConfigError, DataError, RunWriteError, TrainingError
from pyrovae.progress import log, stage
from pyrovae.runs import (
    CHECKPOINT,
    CONFIG,
    LEGACY_CHECKPOINT,
    METRICS,
    UNITS,
    Run,
    RunLock,
    atomic_write_bytes,
    atomic_write_json,
    check_data_fingerprint,
    load_checkpoint,
    migration_message,
    remove_stale_temp_files,
    save_run_checkpoint,
    stored_config,
)
from pyrovae.train import Callback, Trainer


class RunWriter(Callback):
    """Writes the checkpoint and `metrics.json` of a run folder after every epoch.

    Remembers the last checkpoint it (or the run being resumed) completed, so that a failed
    write (`write`) can say which checkpoint `fit --resume` will use.
    """

    def __init__(
        self,
        folder: Path,
        config: Config,
        data_shape: tuple[int, ...],
        data_fingerprint: dict[str, Any] | None = None,
        last_checkpoint: tuple[int, int] | None = None,
    ) -> None:
        self.folder, self.config, self.data_shape = folder, config, data_shape
        self.data_fingerprint = data_fingerprint
        #: (epoch, step) of the last complete checkpoint on disk, None if there is none
        self.last_checkpoint = last_checkpoint

    def write(self, path: Path, action: Callable[[], Any]) -> Any:
        """Run `action` (which writes `path`); turn an `OSError` into a `RunWriteError` that
        names `path` and the last complete checkpoint."""
        try:
            return action()
        except OSError as e:
            if isinstance(e, RunWriteError):
                raise
            if path.suffix == "" and (e.filename2 or e.filename):  # a folder: name the file
                path = Path(e.filename2 or e.filename)
            elif e.filename2 and Path(e.filename2).parent == path.parent:  # one file of a set
                path = Path(e.filename2)
            raise write_error(path, e, self.folder, self.last_checkpoint) from e

    def save(self, trainer: Trainer) -> None:
        state = trainer.state_dict()
        self.write(
            self.folder / CHECKPOINT,
            lambda: save_run_checkpoint(
                self.folder, self.config, self.data_shape, state, self.data_fingerprint
            ),
        )
        self.last_checkpoint = (state["epoch"], state["step_in_epoch"])

    def on_epoch_end(self, trainer: Trainer) -> None:
        self.save(trainer)
        self.write(
            self.folder / METRICS,
            lambda: atomic_write_json(
                self.folder / METRICS, {"history": trainer.history, "units": UNITS}
            ),
        )


def write_error(
    path: Path, e: OSError, folder: Path, last_checkpoint: tuple[int, int] | None
) -> RunWriteError:
    """A one-line `RunWriteError`: which file could not be written, why, and what survived."""
    import shlex

    why = e.strerror or str(e) or type(e).__name__
    ckpt = Path(folder) / CHECKPOINT
    if last_checkpoint is None:
        survived = (
            "no checkpoint was written yet, so there is nothing to resume: run the same "
            "command again once the file system allows writing"
        )
    else:
        epoch, step = last_checkpoint
        survived = (
            f"the last complete checkpoint is epoch {epoch}, step {step}: {ckpt}; "
            f"pyrovae fit --out {shlex.quote(str(folder))} --resume continues from it once the "
            "file system allows writing"
        )
    return RunWriteError(f"could not write {path}: {why}; {survived}", e.errno, why, str(path))


def _first_missing_ancestor(path: Path) -> Path | None:
    """The outermost folder `path.mkdir(parents=True)` would create (None if `path` exists)."""
    path = path.absolute()
    if path.exists():
        return None
    top = path
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    return top


def _resumed_config(
    config, out: Path, accept_plugin_changes: bool = False
) -> tuple[Config, dict[str, Any] | None]:
    """The stored config of the run in `out` (with `train.epochs` from `config` if given)
    and its checkpoint state (None if killed before the first checkpoint)."""
    ckpt, state = out / CHECKPOINT, None
    if ckpt.exists():
        state = load_checkpoint(ckpt)
        stored = stored_config(state, ckpt, accept_plugin_changes)
    elif (out / LEGACY_CHECKPOINT).exists():
        raise CheckpointError(migration_message(out))
    elif (out / CONFIG).is_file():  # killed before the first checkpoint: start over
        stored = load_config(out / CONFIG)
    else:
        raise CheckpointError(
            f"--resume: {out} holds no {CHECKPOINT} (nor {CONFIG}) to continue; expected a "
            "run folder written by `pyrovae fit`. Start a new run with a CONFIG instead"
        )
    if config is not None:
        new = load_config(config)
        same = {"train": {"epochs"}}
        if new.model_dump(exclude=same) != stored.model_dump(exclude=same):
            raise ConfigError(
                f"--resume: the config differs from the one stored in {out / CONFIG} "
                "(only train.epochs may change)"
            )
        if state is not None and new.train.epochs < state["epoch"]:
            raise ConfigError(
                f"--resume: train.epochs must be at least the {state['epoch']} epochs already "
                f"completed in {ckpt}; got {new.train.epochs}"
            )
        stored.train.epochs = new.train.epochs
    return stored, state


def fit(
    config: Config | dict | str | Path | None,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool | None = None,
    data: Dataset | None = None,
    figures: bool = True,
    callbacks: Sequence[Callback] = (),
    accept_plugin_changes: bool = False,
    accept_data_changes: bool = False,
    backend: str = "auto",
) -> Run:
    """Train the model a config describes and write the run folder `out_dir`.

    Everything the user can get wrong (config, data files, data support, shapes) is checked
    before `out_dir` is created, so a bad input leaves no folder behind (nor any parent folder
    created for it). With `resume=True` the run continues from `out_dir/checkpoint.json` (the
    stored config is used; its `train.epochs` may be raised by the given config); if the run
    was killed before its first checkpoint, it starts over from `out_dir/config.toml`. A folder
    of an older pyrovae (`checkpoint.pt`) is refused with the command that converts it
    (`pyrovae migrate`).
    Temporary files a killed process left in `out_dir` are removed. `callbacks` are passed to
    the `Trainer` (after the one that writes the checkpoint every epoch).

    `fit` holds the folder's lock (`pyrovae.runs.RunLock`) from before it writes anything there
    until it returns: a second `fit` on the same folder raises `RunLockedError` naming this
    process's pid. The checkpoint stores a fingerprint of the data (shape, dtype and SHA-256
    of every split, as loaded); on resume, data that differ from it raise `DataError` naming
    the split and what changed, unless `accept_data_changes` (the run then continues on the
    new data, and stores its fingerprint). A failed write (disk full, permission denied)
    raises `RunWriteError` (an `OSError`) naming the file and the last complete checkpoint.

    A plugin model (`[model] kind = "package.module:ClassName"`) is checked first: every sample
    site of its `model(x)` and `guide(x)` must be inside `pyro.plate("data", len(x))`. Each
    minibatch of B of the N training points is then scored with every site scaled by N/B
    (`pyrovae.objectives.data_program`), an unbiased estimate of the full-data ELBO.

    In a process `torchrun` started, `fit` joins the job (`pyrovae.distributed.init`, with
    `backend`) and trains data-parallel: every rank reads the data and the checkpoint, rank 0
    alone holds the lock and writes the run folder, evaluation is sharded over the ranks.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: expected a run folder, got an existing file")
    lock = RunLock(out)
    lead = distributed.launched_rank() == 0  # the one process that writes the folder
    try:
        if out.is_dir() and lead:  # before reading or writing anything in it
            lock.acquire()
        return _fit_locked(
            config, out, lock, resume, progress, data, figures, callbacks,
            accept_plugin_changes, accept_data_changes, backend,
        )
    finally:
        lock.release()


def _fit_locked(
    config: Config | dict | str | Path | None,
    out: Path,
    lock: RunLock,
    resume: bool,
    progress: bool | None,
    data: Dataset | None,
    figures: bool,
    callbacks: Sequence[Callback],
    accept_plugin_changes: bool,
    accept_data_changes: bool,
    backend: str = "auto",
) -> Run:
    """`fit`, with `lock` held if `out` exists (else taken as soon as `out` is created)."""
    ckpt = out / CHECKPOINT
    state = None
    lead = distributed.launched_rank() == 0

    def refuse_existing_run() -> None:
        held = [p.name for p in (ckpt, out / LEGACY_CHECKPOINT) if p.exists()]
        if held:
            raise ConfigError(
                f"{out} already holds a run ({held[0]}): pass --resume to continue it, or "
                "choose another --out"
            )

    if resume:
        cfg, state = _resumed_config(config, out, accept_plugin_changes)
    else:
        cfg = load_config(config)
        refuse_existing_run()
    world = distributed.init(backend, cfg.train.device)  # None unless torchrun started us
    pyro.set_rng_seed(cfg.train.seed)
    with distributed.all_or_none(world):  # a bad input on any rank stops every rank
        data = data if data is not None else load_data(cfg.data, seed=cfg.train.seed)
        source = f"data.dataset={cfg.data.dataset!r}"
        if state is not None and tuple(state["data_shape"]) != tuple(data.shape):
            raise DataError(
                f"--resume: {source}: expected data points of shape "
                f"{tuple(state['data_shape'])}, as the model in {ckpt} was trained on; got shape "
                f"{tuple(data.shape)}. Did the data file change since? Restore it or start a new run."
            )
        distributed.check_job(cfg.train.batch_size, len(data.x_train), world)
        model = build_model(cfg, data.shape)
        check_data_for_model(model, data, f"dataset {cfg.data.dataset!r}")
        if state is None and hasattr(model, "before_training"):  # a CVAE's frozen baseline,
            model.before_training(data)  # a gmvae's pretrained networks and fitted p(z|c)
        if is_plugin_model(model):
            check_program(model, data.x_train[: min(2, len(data.x_train))], f"model.kind = {cfg.model.kind!r}")
        fp = None
        if state is not None and lead:
            fp = check_data_fingerprint(state, data, f"--resume: {source}", ckpt, accept_data_changes)
        elif lead:
            fp = fingerprint(data)
        device = resolve_device(cfg.train.device) if world is None else world.device
        from pyrovae.cuda_graph import check_config

        check_config(cfg.train, device, world)  # train.cuda_graph: before the folder exists

    created = _first_missing_ancestor(out) if lead else None
    with distributed.all_or_none(world):
        if lead:
            out.mkdir(parents=True, exist_ok=True)
            try:
                if lock.fd is None:  # a new folder: lock it before writing anything, then look again
                    lock.acquire()
                    if not resume:
                        refuse_existing_run()
            except OSError:  # not RunLockedError: the folder may be another process's by now
                if created is not None:
                    shutil.rmtree(created, ignore_errors=True)
                raise
            remove_stale_temp_files(out)
    last = (state["epoch"], state["step_in_epoch"]) if state is not None else None
    writer = RunWriter(out, cfg, tuple(data.shape), fp, last)
    extra: list[Callback] = []
    if cfg.train.log and lead:
        from pyrovae.tblog import TensorBoardLogger, parts_data, parts_labels

        parts = parts_data(data, cfg.train.seed)
        extra.append(
            TensorBoardLogger(
                out, tuple(data.shape), parts, cfg.train.log_every, y_parts=parts_labels(data)
            )
        )
    trainer = Trainer(
        model,
        cfg.train,
        data.x_train,
        data.x_val,
        dynamic_binarize=data.binarize == "dynamic",
        device=device,
        callbacks=[writer, *extra, *callbacks] if lead else list(callbacks),
        progress=progress if lead else False,
        y_train=data.y_train,
        y_val=data.y_val,
        world=world,
        x_train_scale=data.x_train_scale,
    )
    try:
        if state is not None:
            try:
                trainer.load_state_dict(state)
            except ValueError as e:
                raise CheckpointError(f"{ckpt}: {e}") from None
        elif lead:
            writer.write(
                out / CONFIG, lambda: atomic_write_bytes(out / CONFIG, cfg.to_toml().encode())
            )
        finished = trainer.train()
        if not finished and lead:
            writer.save(trainer)
    except BaseException as e:
        for cb in extra:
            cb.close()  # before the folder it writes in may be removed
        if created is not None and not ckpt.exists():
            shutil.rmtree(created, ignore_errors=True)  # nothing resumable was written
        if isinstance(e, TrainingError):
            last = f" The last good checkpoint is {ckpt}." if ckpt.exists() else ""
            raise TrainingError(f"{e}{last}") from None
        raise
    finally:
        for cb in extra:
            cb.close()
    run = Run(out, cfg, model, trainer.history, data=data, interrupted=not finished)
    if finished:
        run.metrics = final_metrics(run)  # sharded over the ranks
        if not lead:
            return run
        writer.write(out / METRICS, lambda: atomic_write_json(out / METRICS, run.metrics))
        if figures:
            writer.write(out / "figures", lambda: plots.run_figures(run, out / "figures"))
    return run


def final_metrics(run: Run) -> dict[str, Any]:
    """Test-set metrics (nats per datapoint for ELBOs) plus the per-epoch history."""
    model, data = run.model, run.data
    device = next(model.parameters()).device
    x_test = data.x_test.to(device)
    out: dict[str, Any] = {"history": run.history, "units": UNITS, "kind": run.config.model.kind}
    with evaluate.evaluation_mode(model):
        if hasattr(model, "reconstruct"):
            out["test_reconstruction_error"] = float(
                evaluate.reconstruction_error(model, x_test).mean()
            )
        out["num_parameters"] = sum(p.numel() for p in model.parameters())
        out["train_seconds"] = sum(h["epoch_seconds"] for h in run.history)
        out["test_points"] = int(x_test.shape[0])
        out["binarize"] = run.config.data.binarize
        if hasattr(model, "guide"):
            y = eval_labels(model, data.y_test)

            def fn(i: torch.Tensor) -> torch.Tensor:
                yi = None if y is None else y[i]
                return evaluate.elbo(model.model, model.guide, x_test[i], batch_size=1024, y=yi)

            out["test_elbo"] = float(distributed.per_point(fn, torch.arange(len(x_test))).mean())
        else:
            out["test_elbo"] = None
            with torch.no_grad():
                losses = [float(model.loss(xb)) * len(xb) for xb in x_test.split(1024)]
            out["test_loss"] = sum(losses) / len(x_test)
        if callable(getattr(model, "metrics", None)):  # a structured model's own figures
            y_test = None if data.y_test is None else data.y_test.to(device)
            out.update(model.metrics(x_test, y_test))
    return out


def eval_labels(model: torch.nn.Module, y: torch.Tensor | None) -> torch.Tensor | None:
    r"""The split's labels for a structured model whose ELBO and log-likelihood are
    conditioned on them (`conditions_on_labels = True`, e.g. a label-conditioned CVAE:
    $\log p(x \mid y)$); `None` for every other model (M2's figures are of $\log p(x)$)."""
    if not getattr(model, "conditions_on_labels", False):
        return None
    device = next(model.parameters()).device
    return None if y is None else y.to(device)


def evaluate_run(
    run: Run, iwae_samples: int | None = None, batch_size: int | None = None
) -> dict[str, Any]:
    """Test-split metrics of a run (`final_metrics`), plus `log_likelihood` (IWAE,
    `iwae_samples` = K) with its standard error when asked.

    All values are nats per datapoint. `run` must be loaded with its data
    (`load_run(dir, data=True)`). For an autoencoder run the log-likelihood is `None` with
    the reason in `log_likelihood_note`.
    """
    from pyrovae.errors import PyroVAEError

    if run.data is None:
        raise ValueError("evaluate_run needs the run's data: load_run(dir, data=True)")
    if iwae_samples is not None and iwae_samples < 1:
        raise PyroVAEError(f"--iwae-samples must be at least 1; got {iwae_samples}")
    with stage("test ELBO and reconstruction error"):
        m = final_metrics(run)
    m.pop("history", None)
    if iwae_samples is None:
        return m
    m.update(log_likelihood_samples=iwae_samples, log_likelihood_split="test")
    model = run.model
    if not hasattr(model, "guide"):
        m.update(log_likelihood=None, log_likelihood_se=None)
        m["log_likelihood_note"] = (
            "not defined for an autoencoder: it has no prior p(z) and no q(z|x)"
        )
        return m
    device = next(model.parameters()).device
    with evaluate.evaluation_mode(model), stage(f"IWAE log p(x), K={iwae_samples}"):
        x_test, y = run.data.x_test.to(device), eval_labels(model, run.data.y_test)

        def fn(i: torch.Tensor) -> torch.Tensor:  # datapoints sharded over the ranks (torchrun)
            yi = None if y is None else y[i]
            return evaluate.log_likelihood(
                model.model, model.guide, x_test[i], iwae_samples, batch_size, y=yi
            )

        ll = distributed.per_point(fn, torch.arange(len(x_test)))
    mean, se = evaluate.mean_and_se(ll)
    m.update(log_likelihood=mean, log_likelihood_se=se)
    what = getattr(model, "log_likelihood_of", "log p(x)")
    summed = evaluate.enumerated_sites(
        model.model, model.guide, run.data.x_test[:1].to(device),
        **({} if (y1 := eval_labels(model, run.data.y_test)) is None else {"y": y1[:1]}),
    )
    if summed:
        what += f" with {', '.join(summed)} summed out exactly in each weight"
    m["log_likelihood_note"] = (
        f"importance-sampled {what} (IWAE bound, K={iwae_samples}, proposal q(z|x)) on the "
        f"test split, binarize={run.config.data.binarize!r}; nats per datapoint, higher is "
        "better; negative log-likelihood (NLL) = -log_likelihood"
    )
    return m


def compare(
    config: Config | dict | str | Path, out_dir: str | Path, progress: bool | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """Train the config's VAE and its autoencoder baseline (same networks) into
    `out_dir/vae` and `out_dir/ae`; return `(name, test metrics)` rows."""
    cfg, out = load_config(config), Path(out_dir)
    rows = []
    for kind, name in (("vae", "VAE"), ("ae", f"AE ({cfg.model.variant})")):
        c = cfg.model_copy(deep=True)
        c.model.kind = kind
        log.info("training the %s (%s)", name, out / kind)
        rows.append((name, fit(c, out / kind, progress=progress).metrics))
    return rows


def is_run_folder(path: str | Path) -> bool:
    """Whether `path` is a folder `pyrovae fit` wrote (it holds metrics.json and a checkpoint)."""
    from pyrovae.runs import LEGACY_CHECKPOINT

    d = Path(path)
    return d.is_dir() and (d / METRICS).is_file() and (
        (d / CHECKPOINT).is_file() or (d / LEGACY_CHECKPOINT).is_file()
    )


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


#: the keys of `evaluate_run`'s importance-sampled estimate kept in a run's `metrics.json`
LOG_LIKELIHOOD_KEYS = (
    "log_likelihood",
    "log_likelihood_se",
    "log_likelihood_samples",
    "log_likelihood_split",
    "log_likelihood_note",
)


def record_log_likelihood(folder: str | Path, metrics: dict[str, Any]) -> tuple[bool, str]:
    """Keep `evaluate_run`'s importance-sampled test log-likelihood in `folder/metrics.json`,
    where `compare_runs` (the `test NLL` column of `pyrovae compare RUN ...`) reads it.

    Written under the folder's lock (`RunLock`: not while a `fit` writes it) and atomically;
    an estimate with fewer samples than the stored one is not kept (a larger K gives a tighter
    bound). Returns (written, one line saying what was done or why nothing was written); never
    raises for a folder it cannot write (read-only, locked, no `metrics.json`).
    """
    import json

    from pyrovae.errors import RunLockedError

    d = Path(folder)
    path = d / METRICS
    k = metrics.get("log_likelihood_samples")
    if metrics.get("log_likelihood") is None or not isinstance(k, int):
        return False, f"not recorded in {path}: no importance-sampled log-likelihood to record"
    try:
        with RunLock(d):
            stored = json.loads(path.read_text())
            if not isinstance(stored, dict):
                return False, f"not recorded in {path}: expected a JSON object"
            old = stored.get("log_likelihood_samples")
            if stored.get("log_likelihood") is not None and isinstance(old, int) and old > k:
                return False, (
                    f"not recorded in {path}: it keeps the estimate with K={old} "
                    f"(log_likelihood {stored['log_likelihood']:.4f}); this one has K={k}"
                )
            stored.update({key: metrics[key] for key in LOG_LIKELIHOOD_KEYS if key in metrics})
            atomic_write_json(path, stored)
    except RunLockedError as e:
        return False, f"not recorded in {path}: {e}"
    except (OSError, ValueError) as e:
        return False, f"not recorded in {path}: {e}"
    return True, f"recorded in {path} (K={k}): pyrovae compare shows it as the test NLL"


def compare_runs(dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One row per run folder, read from its `metrics.json` and `config.toml` (no model is
    loaded, no data): name, kind, epochs, final and best validation ELBO (AE: loss) with the
    epoch of the best, test ELBO and, where `metrics.json` holds one, the importance-sampled
    test log-likelihood, training seconds, and `differs`: the config keys whose values are not
    the same in all the runs (`data.root`, `train.device` and `train.log*` left out).

    `CheckpointError` naming the folder for anything that is not a run folder.
    """
    import json

    rows = []
    for d in map(Path, dirs):
        if not d.exists():
            raise CheckpointError(f"{d}: no such run folder")
        if not is_run_folder(d):
            raise CheckpointError(
                f"{d}: not a run folder: expected {METRICS} and {CHECKPOINT} (written by "
                "pyrovae fit); `pyrovae compare CONFIG` trains a VAE and an AE instead"
            )
        try:
            m = json.loads((d / METRICS).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{d / METRICS}: not valid JSON ({e})") from None
        try:
            cfg = load_config(d / CONFIG)
        except ConfigError as e:
            raise CheckpointError(f"{d / CONFIG}: {' '.join(str(e).split())}") from None
        hist = m.get("history") if isinstance(m, dict) else None
        if not isinstance(hist, list) or not all(isinstance(h, dict) for h in hist):
            raise CheckpointError(f"{d / METRICS}: expected a 'history' list of per-epoch tables")
        kind = cfg.model.kind
        key = "val_loss" if kind == "ae" else "val_elbo"
        vals = [(h.get(key), h.get("epoch")) for h in hist if isinstance(h.get(key), (int, float))]
        best = (min if kind == "ae" else max)(vals, default=(None, None))
        ll = m.get("log_likelihood")
        rows.append(
            {
                "name": d.name or str(d),
                "dir": str(d),
                "kind": kind,
                "epochs": len(hist),
                "final_val": vals[-1][0] if vals else None,
                "best_val": best[0],
                "best_epoch": best[1],
                "val_metric": key,
                "test_elbo": m.get("test_elbo"),
                "test_nll": -ll if isinstance(ll, (int, float)) else None,
                "seconds": m.get("train_seconds", sum(h.get("epoch_seconds", 0) for h in hist)),
                "finished": "test_points" in m,
                "history": hist,
                "config": _flat(cfg.to_dict()),
            }
        )
    skip = ("data.root", "train.device", "train.log", "train.log_every")
    keys = sorted({k for r in rows for k in r["config"]} - set(skip))
    differ = [k for k in keys if len({repr(r["config"].get(k)) for r in rows}) > 1]
    for r in rows:
        r["differs"] = {k: r["config"].get(k) for k in differ}
    names = [r["name"] for r in rows]
    if len(set(names)) < len(names):  # same folder names in different places: full paths
        for r in rows:
            r["name"] = r["dir"]
    return rows
