"""`pyrovae diagnose RUN_DIR`: posterior diagnostics of a trained run (registered on import).

Prints a plain-text summary (or JSON with `--json`) and writes a self-contained HTML report
with `--report`. See `pyrovae.diagnostics` for what each number means.
"""

from __future__ import annotations

import argparse
import json
import sys

from pyrovae.cli import EXTRA_COMMANDS, data_args
from pyrovae.errors import PyroVAEError

EPILOG = """\
examples:
  pyrovae diagnose runs/vae
  pyrovae diagnose runs/vae --report runs/vae/diagnostics.html
  pyrovae diagnose runs/vae --json --points 0          # skip NUTS
  pyrovae diagnose runs/vae --iwae-samples 5000 --points 8
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Posterior diagnostics of a trained run on its test split (nats per datapoint)."
    p.epilog = EPILOG
    p.add_argument("run_dir")
    data_args(p)
    p.add_argument("--json", action="store_true", help="print all numbers as JSON")
    p.add_argument("--report", metavar="FILE.html", help="write a self-contained HTML report")
    p.add_argument(
        "--docs-url",
        metavar="URL",
        help="where the built docs are (e.g. file:///path/to/site): verdicts link there",
    )
    p.add_argument(
        "--points",
        type=int,
        default=4,
        help="test points for the NUTS gold standard (0: skip; default 4)",
    )
    p.add_argument(
        "--iwae-samples",
        type=int,
        default=1000,
        metavar="K",
        help="importance samples for log p(x) (default 1000)",
    )
    p.add_argument(
        "--khat-samples",
        type=int,
        default=1000,
        metavar="K",
        help="importance samples per point for PSIS k-hat (default 1000)",
    )
    p.add_argument(
        "--max-points",
        type=int,
        default=1000,
        help="cap on test points for the decomposition, k-hat, I(x;z) (default 1000)",
    )
    p.add_argument(
        "--gap-points",
        type=int,
        default=50,
        help="test points for the amortization gap (0: skip; default 50)",
    )
    p.add_argument(
        "--iwae-points",
        type=int,
        default=2000,
        help="test points for the IWAE log-likelihood and the ELBO (0: all; default 2000)",
    )
    p.add_argument("--chains", type=int, default=4, help="NUTS chains (default 4)")
    p.add_argument(
        "--nuts-samples", type=int, default=200, help="NUTS draws per chain (default 200)"
    )
    p.add_argument(
        "--nuts-warmup", type=int, default=200, help="NUTS warm-up steps per chain (default 200)"
    )
    p.add_argument("--seed", type=int, default=0)


def _check(args: argparse.Namespace) -> None:
    from pyrovae.diagnostics import KHAT_MIN_SAMPLES

    for name, low in (
        ("points", 0),
        ("iwae_samples", 1),
        ("khat_samples", KHAT_MIN_SAMPLES),
        ("max_points", 2),
        ("gap_points", 0),
        ("chains", 1),
        ("iwae_points", 0),
        ("nuts_samples", 4),
        ("nuts_warmup", 0),
    ):
        v = getattr(args, name)
        if v < low:
            raise PyroVAEError(f"--{name.replace('_', '-')} must be at least {low}; got {v}")
    if args.report and not args.report.lower().endswith((".html", ".htm")):
        raise PyroVAEError(f"--report {args.report}: expected a file name ending in .html")


def _print_text(r: dict) -> None:
    print(f"run: {r['run']} ({r['kind']}), {r['points']} test points")
    if r["kind"] == "ae":
        print(
            f"reconstruction error      {r['reconstruction_error']:.4f} (sum of squared errors per datapoint)"
        )
        print(f"codes used                {r['codes_used']} of {r['latent_dim']} (variance > 0.01)")
        print(r["not_applicable"])
        return
    if r.get("structured"):
        _print_structured(r)
        return
    ll, el, d = r["log_likelihood"], r["elbo"], r["decomposition"]
    print(
        f"log-likelihood (IWAE K={ll['samples']})  {ll['mean']:.3f} ± {ll['se']:.3f} nats per datapoint"
    )
    print(f"ELBO (1 sample)           {el['mean']:.3f} ± {el['se']:.3f}")
    print(f"reconstruction, KL        {d['reconstruction']:.3f}, {d['kl']:.3f}")
    print(
        f"I(x;z), KL(q(z)||p(z))    {d['mutual_information']:.3f}, {d['aggregate_kl']:.3f} (log N = {d['log_n']:.2f})"
    )
    print(f"active units              {d['active_units']} of {d['latent_dim']}")
    p = r["psis"]
    print(
        f"PSIS k-hat                <0.5: {p['share_below_0.5']:.0%}  0.5-0.7: {p['share_0.5_to_0.7']:.0%}  >0.7: {p['share_above_0.7']:.0%}"
    )
    if "amortization" in r:
        a = r["amortization"]
        print(
            f"gaps: approximation       {a['approximation_gap']:.3f}, amortization {a['amortization_gap']:.3f}"
        )
    for k, v in r["verdicts"].items():
        print(f"- {k}: {v}")


def _print_structured(r: dict) -> None:
    ll, el, p = r["log_likelihood"], r["elbo"], r["psis"]
    print(
        f"log-likelihood (IWAE K={ll['samples']})  {ll['mean']:.3f} ± {ll['se']:.3f} nats per "
        f"datapoint ({ll['of']}; {ll['estimator']})"
    )
    print(f"ELBO (1 sample)           {el['mean']:.3f} ± {el['se']:.3f}")
    if p is None:  # no latent variable
        print(r["not_applicable"])
        return
    print(
        f"PSIS k-hat                <0.5: {p['share_below_0.5']:.0%}  0.5-0.7: {p['share_0.5_to_0.7']:.0%}  >0.7: {p['share_above_0.7']:.0%}"
    )
    for name, s in r["latent_sites"].items():
        print(f"site {name}: KL {s['kl']:.3f} nats, active units {s['active_units']} of {s['dim']}")
    nu = r.get("nuts")
    if nu and "skipped" in nu:
        print(f"NUTS: skipped, {nu['skipped']}")
    elif nu:
        summed = f"; {', '.join(nu['summed_out'])} summed out" if nu["summed_out"] else ""
        print(
            f"NUTS on {len(nu['points'])} test points ({nu['chains']} chains x "
            f"{nu['warmup']}+{nu['draws']}, conditioned on {nu['conditioned_on']}{summed}): max "
            f"R-hat {nu['max_rhat']:.3f}, min ESS {nu['min_ess']:.0f}, {nu['divergences']} "
            "divergences"
        )
        print(f"  {nu['verdict']}")
    print(r["not_applicable"])


def run_diagnose(args: argparse.Namespace) -> int:
    from pyrovae.diagnostics import diagnose_run
    from pyrovae.runs import load_run

    _check(args)
    from pyrovae.diagnostics import DiagnoseOptions, plan
    from pyrovae.progress import log, stage

    run = load_run(
        args.run_dir,
        data=True,
        accept_plugin_changes=args.accept_plugin_changes,
        accept_data_changes=args.accept_data_changes,
    )
    options = DiagnoseOptions(
        points=args.points,
        iwae_samples=args.iwae_samples,
        iwae_points=args.iwae_points or None,
        khat_samples=args.khat_samples,
        max_points=args.max_points,
        gap_points=args.gap_points,
        chains=args.chains,
        nuts_samples=args.nuts_samples,
        nuts_warmup=args.nuts_warmup,
        seed=args.seed,
    )
    from pyrovae.structured import STRUCTURED

    structured = isinstance(run.model, tuple(STRUCTURED.values()))
    if structured and args.report:
        raise PyroVAEError(
            f"--report: the HTML report covers 'vae' runs; {args.run_dir} is a "
            f"{run.config.model.kind!r} model: use the text or --json output"
        )
    from pyrovae import distributed

    world = distributed.init("gloo", "cpu")  # under torchrun: k-hat and IWAE sharded over ranks
    if hasattr(run.model, "guide") and not structured and log.isEnabledFor(20) and world is None:
        log.info("%s", plan(run, options))
    try:
        diag = diagnose_run(run, options)
    finally:
        distributed.shutdown()
    if distributed.launched_rank() != 0:  # rank 0 prints and writes the report
        return 0
    if args.report:
        from pyrovae.report import write_report

        with stage("report and figures"):
            path = write_report(diag, args.report, docs_url=args.docs_url)
        print(f"wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(diag.results, indent=2))
    else:
        _print_text(diag.results)
    return 0


EXTRA_COMMANDS["diagnose"] = (
    add_arguments,
    run_diagnose,
    "posterior diagnostics of a run (k-hat, KL per dim, NUTS, gaps) and an HTML report",
)
