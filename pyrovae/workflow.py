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

from pyrovae import evaluate, plots
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
    METRICS,
    UNITS,
    Run,
    RunLock,
    atomic_write_bytes,
    atomic_write_json,
    check_data_fingerprint,
    load_checkpoint,
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
) -> Run:
    """Train the model a config describes and write the run folder `out_dir`.

    Everything the user can get wrong (config, data files, data support, shapes) is checked
    before `out_dir` is created, so a bad input leaves no folder behind (nor any parent folder
    created for it). With `resume=True` the run continues from `out_dir/checkpoint.pt` (the
    stored config is used; its `train.epochs` may be raised by the given config); if the run
    was killed before its first checkpoint, it starts over from `out_dir/config.toml`.
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
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: expected a run folder, got an existing file")
    lock = RunLock(out)
    try:
        if out.is_dir():  # before reading or writing anything in it
            lock.acquire()
        return _fit_locked(
            config, out, lock, resume, progress, data, figures, callbacks,
            accept_plugin_changes, accept_data_changes,
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
) -> Run:
    """`fit`, with `lock` held if `out` exists (else taken as soon as `out` is created)."""
    ckpt = out / CHECKPOINT
    state = None

    def refuse_existing_run() -> None:
        if ckpt.exists():
            raise ConfigError(
                f"{out} already holds a run (checkpoint.pt): pass --resume to continue it, or "
                "choose another --out"
            )

    if resume:
        cfg, state = _resumed_config(config, out, accept_plugin_changes)
    else:
        cfg = load_config(config)
        refuse_existing_run()
    pyro.set_rng_seed(cfg.train.seed)
    data = data if data is not None else load_data(cfg.data, seed=cfg.train.seed)
    source = f"data.dataset={cfg.data.dataset!r}"
    if state is not None and tuple(state["data_shape"]) != tuple(data.shape):
        raise DataError(
            f"--resume: {source}: expected data points of shape "
            f"{tuple(state['data_shape'])}, as the model in {ckpt} was trained on; got shape "
            f"{tuple(data.shape)}. Did the data file change since? Restore it or start a new run."
        )
    model = build_model(cfg, data.shape)
    check_data_for_model(model, data, f"dataset {cfg.data.dataset!r}")
    if is_plugin_model(model):
        check_program(model, data.x_train[: min(2, len(data.x_train))], f"model.kind = {cfg.model.kind!r}")
    if state is not None:
        fp = check_data_fingerprint(state, data, f"--resume: {source}", ckpt, accept_data_changes)
    else:
        fp = fingerprint(data)
    device = resolve_device(cfg.train.device)

    created = _first_missing_ancestor(out)
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
    trainer = Trainer(
        model,
        cfg.train,
        data.x_train,
        data.x_val,
        dynamic_binarize=data.binarize == "dynamic",
        device=device,
        callbacks=[writer, *callbacks],
        progress=progress,
        y_train=data.y_train,
        y_val=data.y_val,
    )
    try:
        if state is not None:
            try:
                trainer.load_state_dict(state)
            except ValueError as e:
                raise CheckpointError(f"{ckpt}: {e}") from None
        else:
            writer.write(
                out / CONFIG, lambda: atomic_write_bytes(out / CONFIG, cfg.to_toml().encode())
            )
        finished = trainer.train()
        if not finished:
            writer.save(trainer)
    except BaseException as e:
        if created is not None and not ckpt.exists():
            shutil.rmtree(created, ignore_errors=True)  # nothing resumable was written
        if isinstance(e, TrainingError):
            last = f" The last good checkpoint is {ckpt}." if ckpt.exists() else ""
            raise TrainingError(f"{e}{last}") from None
        raise
    run = Run(out, cfg, model, trainer.history, data=data, interrupted=not finished)
    if finished:
        run.metrics = final_metrics(run)
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
            out["test_elbo"] = float(
                evaluate.elbo(model.model, model.guide, x_test, batch_size=1024, y=y).mean()
            )
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
        ll = evaluate.log_likelihood(
            model.model,
            model.guide,
            run.data.x_test.to(device),
            iwae_samples,
            batch_size,
            y=eval_labels(model, run.data.y_test),
        )
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
