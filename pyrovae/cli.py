"""Command-line interface: `pyrovae fit | evaluate | sample | compare | migrate`.

User errors (bad config, bad data, missing files, unsafe checkpoints, data changed since
training, a run folder another `fit` is writing) print one line starting with `pyrovae: error:`
and exit with status 2; no traceback. Errors of the file system (permission denied, disk full)
print one line and exit with status 1; while writing a run folder, the line names the file and
the last complete checkpoint that `fit --resume` continues from. Ctrl-C (SIGINT) or SIGTERM
during `fit` writes a checkpoint and exits with status 130; `--resume` continues.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from pyrovae.errors import PyroVAEError, RunWriteError

EPILOG_FIT = """\
examples:
  pyrovae fit examples/configs/digits_vae.toml --out runs/vae
  pyrovae fit examples/configs/digits_vae.toml --out runs/vae --set train.epochs=5 --set model.latent_dim=8
  pyrovae fit CONFIG --out runs/vae --set 'model.prior={kind="mixture", components=10}'
  pyrovae fit CONFIG --out runs/vae --resume            # continue after Ctrl-C or a crash
  pyrovae fit CONFIG --out runs/vae --nproc 2           # data-parallel, 2 processes (torchrun)
  torchrun --nproc-per-node 2 -m pyrovae fit CONFIG --out runs/vae   # the same, launched by hand
"""
EPILOG_EVALUATE = """\
examples:
  pyrovae evaluate runs/vae
  pyrovae evaluate runs/vae --json
  pyrovae evaluate runs/vae --iwae-samples 5000 --json   # adds the importance-sampled log p(x)
"""
EPILOG_SAMPLE = """\
examples:
  pyrovae sample runs/vae -n 64 --out samples.png
  pyrovae sample runs/m2 -n 16 --label 3 --out threes.png     # structured models: a condition
  pyrovae sample runs/gmvae -n 16 --cluster 2 --out c2.png
"""
EPILOG_COMPARE = """\
examples:
  pyrovae compare examples/configs/digits_vae.toml --out runs/compare
  pyrovae compare CONFIG --out runs/compare --set train.epochs=10
  pyrovae compare runs/* --out curves.png      # one table of many run folders, and their curves
"""

#: other modules add subcommands here: name -> (add_arguments, handler)
EXTRA_COMMANDS: dict[
    str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]
] = {}


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def comparison_table(rows: list[tuple[str, dict]]) -> str:
    """Side-by-side table of finished runs' metrics."""
    head = ["model", "test ELBO (nats/pt)", "recon. error (SSE/pt)", "parameters", "train seconds"]
    body = [
        [
            name,
            _fmt(m.get("test_elbo")),
            _fmt(m.get("test_reconstruction_error"), 3),
            f"{m.get('num_parameters', 0):,}",
            _fmt(m.get("train_seconds"), 1),
        ]
        for name, m in rows
    ]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

    def line(r: list[str]) -> str:
        cells = zip(r, widths, strict=True)
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells))

    sep = "  ".join("-" * w for w in widths)
    notes = (
        "test ELBO: single-sample ELBO estimate averaged over the test split (a lower bound on log p(x); "
        "the AE has none). recon. error: sum of squared errors per test point, x̂ = E[x|z=E_q z]."
    )
    return "\n".join([line(head), sep, *[line(r) for r in body], "", textwrap.fill(notes, 100)])


def _fit_argv(args: argparse.Namespace) -> list[str]:
    """The `fit` command line of `args` without `--nproc` (what each rank runs)."""
    argv = ["fit", *([args.config] if args.config else []), "--out", args.out]
    argv += [a for kv in args.set for a in ("--set", kv)]
    argv += [a for p in args.plugin for a in ("--plugin", p)]
    flags = ("resume", "quiet", "verbose", "accept_plugin_changes", "accept_data_changes")
    argv += [f"--{f.replace('_', '-')}" for f in flags if getattr(args, f)]
    return [*argv, "--backend", args.backend]


def _cmd_fit(args: argparse.Namespace) -> int:
    from pyrovae import distributed
    from pyrovae.runs import CHECKPOINT
    from pyrovae.workflow import fit

    config = args.config
    if config is None and not args.resume:
        raise PyroVAEError("fit needs a CONFIG file (or --resume to continue the run in --out)")
    if args.nproc is not None:
        if distributed.launched():
            raise PyroVAEError("--nproc: this process was already started by torchrun; drop --nproc")
        code, failure = distributed.launch(args.nproc, _fit_argv(args))
        if failure is not None:
            ckpt = Path(args.out) / CHECKPOINT
            last = (
                f"; the last complete checkpoint {ckpt} is kept: pyrovae fit --out "
                f"{shlex.quote(str(args.out))} --resume continues from it"
                if ckpt.exists() else "; no checkpoint was written yet"
            )
            print(f"pyrovae: error: {failure}{last}", file=sys.stderr)
        return code
    if config is None and args.set:  # --resume --set train.epochs=N: edit the stored config
        config = Path(args.out) / "config.toml"
    try:
        run = fit(
            _config_with_overrides(config, args.set) if config else None,
            args.out,
            resume=args.resume,
            progress=False if args.quiet else None,
            accept_plugin_changes=args.accept_plugin_changes,
            accept_data_changes=args.accept_data_changes,
            backend=args.backend,
        )
    finally:
        distributed.shutdown()
    if distributed.launched_rank() != 0:
        return 130 if run.interrupted else 0  # rank 0 reports
    if run.interrupted:
        print(
            f"pyrovae: interrupted; checkpoint written to {run.dir / CHECKPOINT} "
            f"(epoch {len(run.history)} complete). Continue with: "
            f"pyrovae fit --out {shlex.quote(str(args.out))} --resume",
            file=sys.stderr,
        )
        return 130
    m = run.metrics
    if m.get("test_elbo") is not None:
        print(
            f"test ELBO: {m['test_elbo']:.3f} nats per datapoint ({m['test_points']} test points, 1 sample each)"
        )
    if m.get("test_reconstruction_error") is not None:
        print(
            f"test reconstruction error: {m['test_reconstruction_error']:.4f} (sum of squared errors per datapoint)"
        )
    print(f"run folder: {run.dir}")
    return 0


def _config_with_overrides(config, overrides):
    from pyrovae.config import load_config

    return load_config(config, overrides)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pyrovae import distributed
    from pyrovae.runs import load_run
    from pyrovae.workflow import evaluate_run, record_log_likelihood

    run = load_run(
        args.run_dir,
        data=True,
        accept_plugin_changes=args.accept_plugin_changes,
        accept_data_changes=args.accept_data_changes,
    )
    world = distributed.init("gloo", "cpu")  # under torchrun: the test points sharded over ranks
    if world is not None:  # each rank its own, reproducible noise stream
        import torch

        torch.manual_seed(distributed.step_seed(run.config.train.seed, -1, 0, world.rank) % 2**62)
    try:
        m = evaluate_run(run, args.iwae_samples)
    finally:
        distributed.shutdown()
    if distributed.launched_rank() != 0:
        return 0
    if args.json:
        print(json.dumps(m, indent=2))
    else:
        for k, v in m.items():
            print(f"{k:28s} {_fmt(v, 4)}")
    if args.iwae_samples is not None and m.get("log_likelihood") is not None:
        from pyrovae.progress import log

        if args.accept_data_changes and not args.no_record:
            log.warning("log-likelihood not recorded in the run folder: --accept-data-changes")
        elif not args.no_record:
            written, line = record_log_likelihood(args.run_dir, m)
            (log.info if written else log.warning)(line)
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from pyrovae.model import VAE
    from pyrovae.plots import image_grid
    from pyrovae.runs import load_run

    if args.n < 1:
        raise PyroVAEError(f"-n must be at least 1; got {args.n}")
    run = load_run(args.run_dir, accept_plugin_changes=args.accept_plugin_changes)
    model = run.model
    torch.manual_seed(args.seed)
    condition = {k: v for k, v in (("label", args.label), ("cluster", args.cluster)) if v is not None}
    if isinstance(model, _structured_types()):
        x, title = _structured_sample(model, args, condition)
    elif condition:
        flag = "--" + next(iter(condition))
        raise PyroVAEError(
            f"{flag}: the model of {args.run_dir} ({run.config.model.kind}) takes no condition; "
            "expected a structured model that takes it (e.g. kind = 'm2' or 'cvae' for --label, "
            "'gmvae' for --cluster)"
        )
    elif isinstance(model, VAE):
        x, title = model.sample(args.n), "E[x|z], z ~ p(z)"
    elif not hasattr(model, "decode_prior_draws"):  # a plugin model
        if not callable(getattr(model, "sample", None)):
            raise PyroVAEError(
                f"{args.run_dir}: the model {type(model).__name__} ({run.config.model.kind}) has "
                "no sample(n) method, so pyrovae cannot draw from it; add one returning an "
                "(n, D) tensor"
            )
        with torch.no_grad():
            x, title = model.sample(args.n), f"samples of {type(model).__name__}"
    else:
        x, title = (
            model.decode_prior_draws(args.n, torch.Generator().manual_seed(args.seed)),
            "AE decoder(z), z ~ N(0, I)",
        )
    shape = model.data_shape
    if run.config.data.codes_from:  # a model of a VAE's codes (M1+M2): show what they decode to
        try:
            m1 = load_run(run.config.data.codes_from).model.to(x.device).eval()
        except PyroVAEError as e:
            raise PyroVAEError(f"data.codes_from of {args.run_dir}: {e}") from None
        with torch.no_grad():
            x, shape = m1.decode(x), m1.data_shape
        title += f", decoded by {run.config.data.codes_from}"
    out = Path(args.out)
    if out.suffix.lower() == ".npy":
        import numpy as np

        out.parent.mkdir(parents=True, exist_ok=True)  # as image_grid does for .png
        np.save(out, x.reshape(-1, *shape).cpu().numpy())
    elif len(shape) == 3 and shape[0] in (1, 3):
        image_grid(x, shape, out, title)
    else:
        raise PyroVAEError(f"--out {out}: data of shape {shape} are not images; use a .npy file")
    print(f"wrote {args.n} samples to {out}")
    return 0


def _structured_types() -> tuple[type, ...]:
    from pyrovae.structured import STRUCTURED

    return tuple(STRUCTURED.values())


def _structured_sample(model, args: argparse.Namespace, condition: dict):
    """`model.sample(n, **condition)` of a structured model; a one-line error naming the flag
    when the model does not take that condition or the value is out of range."""
    import inspect

    import torch

    params = inspect.signature(model.sample).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key in condition:
        if key not in params and not takes_any:
            takes = [f"--{p}" for p in params if p not in ("self", "n")]
            raise PyroVAEError(
                f"--{key}: model.kind = {model.kind!r} does not take this condition; it takes "
                f"{', '.join(takes) or 'none'}"
            )
    try:
        with torch.no_grad():
            x = model.sample(args.n, **condition)
    except ValueError as e:  # the model's own check of the condition's value
        raise PyroVAEError(str(e).splitlines()[0]) from None
    what = ", ".join(f"{k} = {v}" for k, v in condition.items())
    return x, f"{model.kind} samples" + (f", {what}" if what else "")


def runs_table(rows: list[dict]) -> str:
    """One table of many run folders (`pyrovae.workflow.compare_runs` rows)."""
    head = ["run", "kind", "epochs", "final val", "best val (epoch)", "test ELBO", "test NLL",
            "seconds", "differs"]  # fmt: skip
    body = []
    for r in rows:
        best = "—" if r["best_val"] is None else f"{r['best_val']:.2f} ({r['best_epoch']})"
        differs = ", ".join(f"{k}={v}" for k, v in r["differs"].items()) or "—"
        body.append([
            r["name"], r["kind"], str(r["epochs"]) + ("" if r["finished"] else " (running or stopped)"),
            _fmt(r["final_val"]), best, _fmt(r["test_elbo"]), _fmt(r["test_nll"]),
            _fmt(r["seconds"], 1), differs if len(differs) <= 80 else differs[:77] + "...",
        ])  # fmt: skip
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        out = []
        for i, (c, w) in enumerate(zip(cells, widths, strict=True)):
            out.append(c.ljust(w) if i in (0, 1, len(head) - 1) else c.rjust(w))
        return "  ".join(out).rstrip()

    notes = (
        "final/best val: validation ELBO (VAE, higher is better) or validation loss (AE, lower "
        "is better) per epoch, nats per datapoint; test ELBO: single-sample ELBO on the test "
        "split at the end of fit; test NLL: importance-sampled -log p(x) where metrics.json "
        "holds one (kept there by pyrovae evaluate --iwae-samples K); differs: config values that are not the same in every run."
    )
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), sep, *[line(x) for x in body], "", textwrap.fill(notes, 100)])


def _cmd_compare(args: argparse.Namespace) -> int:
    from pyrovae.config import load_config
    from pyrovae.workflow import compare, compare_runs

    targets = list(args.targets)
    if targets and (len(targets) > 1 or Path(targets[0]).is_dir()):
        bad = next((t for t in targets if not Path(t).is_dir()), None)
        if bad is not None:
            raise PyroVAEError(
                f"{bad}: not a run folder ({'no such folder' if not Path(bad).exists() else 'a file'}); "
                "expected run folders written by pyrovae fit (pyrovae compare RUN RUN ...) or "
                "one CONFIG file"
            )
        if args.set:
            raise PyroVAEError("--set applies to pyrovae compare CONFIG, not to run folders")
        out = Path(args.out) if args.out else None
        if out is not None and out.suffix.lower() not in (".png", ".pdf", ".svg"):
            raise PyroVAEError(f"--out {out}: expected a .png, .pdf or .svg file for the plot")
        rows = compare_runs(targets)
        print(runs_table(rows))
        if out is not None:
            from pyrovae.plots import compare_curves

            compare_curves(rows, out)
            print(f"\nplot of the {len(rows)} runs' curves: {out}")
        return 0
    if not args.out:
        raise PyroVAEError("pyrovae compare CONFIG needs --out FOLDER (where the VAE and AE runs go)")
    out = Path(args.out)
    rows = compare(load_config(targets[0] if targets else None, args.set), out)
    table = comparison_table(rows)
    (out / "comparison.txt").write_text(table + "\n")
    print(table)
    print(f"\nrun folders: {out / 'vae'}, {out / 'ae'}; figures in their figures/ folders")
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    from pyrovae.runs import migrate_run

    for folder in args.run_dirs:
        path, converted = migrate_run(folder)
        if converted:
            print(f"converted {folder}: checkpoint.pt -> {path.name} + {path.parent.name}/*.safetensors")
        else:
            print(f"{folder}: already in the current format ({path.name})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyrovae",
        description="Variational autoencoders as Pyro programs, with a deterministic autoencoder baseline.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  pyrovae compare examples/configs/digits_vae.toml --out runs/demo\n  pyrovae fit CONFIG --out runs/vae\n  pyrovae evaluate runs/vae --json\n  pyrovae sample runs/vae -n 64 --out samples.png\n\nRun 'pyrovae COMMAND --help' for each command's options.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p.set_defaults(
        plugin=[], accept_plugin_changes=False, accept_data_changes=False, quiet=False, verbose=False
    )
    raw = argparse.RawDescriptionHelpFormatter

    f = sub.add_parser(
        "fit", help="train the model a config describes", epilog=EPILOG_FIT, formatter_class=raw
    )
    f.add_argument("config", nargs="?", help="TOML config file (optional with --resume)")
    f.add_argument("--out", required=True, help="run folder to create (or continue with --resume)")
    f.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. train.epochs=5 (repeatable)",
    )
    f.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its checkpoint"
    )
    f.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="train data-parallel in N processes on this machine (runs torchrun --standalone "
        "--nproc-per-node N); train.batch_size is the global batch",
    )
    f.add_argument(
        "--backend",
        choices=("auto", "gloo", "nccl"),
        default="auto",
        help="torch.distributed backend under torchrun / --nproc (auto: NCCL on CUDA, else gloo)",
    )
    _plugin_args(f)
    data_args(f)
    f.set_defaults(func=_cmd_fit)

    e = sub.add_parser(
        "evaluate", help="test-set metrics of a run", epilog=EPILOG_EVALUATE, formatter_class=raw
    )
    e.add_argument("run_dir")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.add_argument(
        "--iwae-samples",
        type=int,
        default=None,
        metavar="K",
        help="also estimate log p(x) by importance sampling with K samples (the IWAE bound); "
        "kept in the run's metrics.json (the test NLL of pyrovae compare) unless a larger K "
        "is kept there already",
    )
    e.add_argument(
        "--no-record",
        action="store_true",
        help="leave the run folder untouched (do not keep the --iwae-samples estimate)",
    )
    _plugin_args(e)
    data_args(e)
    e.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser(
        "sample", help="draw samples from a trained VAE", epilog=EPILOG_SAMPLE, formatter_class=raw
    )
    s.add_argument("run_dir")
    s.add_argument("-n", type=int, default=64, help="number of samples (default 64)")
    s.add_argument("--out", required=True, help="output .png (image grid) or .npy")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--label",
        type=int,
        default=None,
        help="structured models conditioned on a class (cvae, m2): draw from p(x | y = LABEL)",
    )
    s.add_argument(
        "--cluster",
        type=int,
        default=None,
        help="structured models with a mixture component (gmvae): draw from p(x | c = CLUSTER)",
    )
    _plugin_args(s)
    s.set_defaults(func=_cmd_sample)

    c = sub.add_parser(
        "compare",
        help="train the VAE and the AE baseline from one config, or tabulate and plot run folders",
        epilog=EPILOG_COMPARE,
        formatter_class=raw,
    )
    c.add_argument(
        "targets",
        nargs="*",
        metavar="CONFIG | RUN",
        help="one TOML config (default: the built-in digits config): train a VAE and its AE; "
        "or run folders: one table of them and a plot of their curves",
    )
    c.add_argument(
        "--out",
        default=None,
        help="CONFIG: the folder for the two runs (required); RUN folders: the plot (.png, .pdf, .svg)",
    )
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    _plugin_args(c, accept=False)
    c.set_defaults(func=_cmd_compare)

    m = sub.add_parser(
        "migrate",
        help="convert run folders of an older pyrovae (checkpoint.pt) to safetensors + JSON",
        epilog="examples:\n  pyrovae migrate runs/vae\n  pyrovae migrate runs/*\n\n"
        "The pickled checkpoint.pt is read with torch.load(weights_only=True) (no code is run),\n"
        "checked, written as checkpoint.json + checkpoint-NNNNNN.safetensors, and deleted only\n"
        "once the new files are complete: a crash at any moment leaves a loadable folder.",
        formatter_class=raw,
    )
    m.add_argument("run_dirs", nargs="+", metavar="RUN")
    _plugin_args(m, accept=False)
    m.set_defaults(func=_cmd_migrate)

    import importlib

    # under `python -m pyrovae.cli` this file is __main__; extensions register in pyrovae.cli
    registered = importlib.import_module("pyrovae.cli").EXTRA_COMMANDS
    for name, (add_args, handler, help_) in registered.items():
        x = sub.add_parser(name, help=help_, formatter_class=raw)
        add_args(x)
        _plugin_args(x)
        x.set_defaults(func=handler)
    return p


def _plugin_args(parser: argparse.ArgumentParser, accept: bool = True) -> None:
    """Options every command has: plugins, and how much it says on stderr."""
    talk = parser.add_mutually_exclusive_group()
    talk.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars or log lines, only errors"
    )
    talk.add_argument("-v", "--verbose", action="store_true", help="debug log lines as well")
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE",
        help="import a Python file of plugins (priors, likelihoods, networks, guides, models) "
        "first (repeatable); plugins named 'package.module:Class' come from the environment",
    )
    if accept:
        parser.add_argument(
            "--accept-plugin-changes",
            action="store_true",
            help="load a run whose plugin source changed since it was trained",
        )


def data_args(parser: argparse.ArgumentParser) -> None:
    """`--accept-data-changes`, for commands that load a run's data."""
    parser.add_argument(
        "--accept-data-changes",
        action="store_true",
        help="use the run's data source even if its data changed since the run was trained "
        "(shape, dtype or content of a split; refused by default)",
    )


def _load_extensions() -> None:
    """Import modules that register extra subcommands (diagnostics etc.) if present."""
    import importlib

    for mod in ("pyrovae.cli_diagnose",):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def _reports() -> bool:
    """Whether this process prints errors: always, except ranks > 0 under torchrun (rank 0
    reports for the job)."""
    from pyrovae.distributed import launched_rank

    return launched_rank() == 0


def main(argv: list[str] | None = None) -> int:
    _load_extensions()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from pyrovae.progress import configure
        from pyrovae.registry import load_plugin

        configure(-1 if args.quiet else (1 if args.verbose else 0))
        for path in args.plugin:
            load_plugin(path)
        return int(args.func(args) or 0)
    except PyroVAEError as e:
        msg = str(e).replace("\n", "\n  ")
        if _reports():
            print(f"pyrovae: error: {msg}", file=sys.stderr)
        return 2
    except RunWriteError as e:  # a run folder's file: the message says what survived
        print(f"pyrovae: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the file system said no (permissions, disk full, ...): not a bug
        where = f": {e.filename}" if e.filename else ""
        print(f"pyrovae: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pyrovae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
