"""The self-contained HTML report of `pyrovae diagnose` and its figures.

Figures are drawn with matplotlib (Agg) into PNG bytes and embedded as base64 `data:` URIs,
so the report is one file that opens from disk in any browser, with no network access.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pyrovae.diagnostics import ACTIVE_THRESHOLD, KHAT_BAD, KHAT_GOOD, Diagnosis  # noqa: E402


# ------------------------------------------------------------------------------------ figures
def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def latent_usage_figure(kl_per_dim: list[float] | None, mean_variance: list[float]) -> bytes:
    """Bars: KL(q(z_u|x)||p(z_u)) per dimension and Cov_x E_q[z_u] with the 0.01 threshold."""
    d = len(mean_variance)
    fig, axes = plt.subplots(1, 2, figsize=(min(max(8.0, 2 + 0.4 * d), 14), 3))
    u = np.arange(d)
    if kl_per_dim is not None:
        axes[0].bar(u, kl_per_dim, color="tab:blue")
        axes[0].set_ylabel("nats")
    else:
        axes[0].text(0.5, 0.5, "not available\nfor this q / prior", ha="center", va="center")
    axes[0].set_title("mean KL per latent dimension", fontsize=9)
    var = np.maximum(np.asarray(mean_variance), 1e-12)
    colors = ["tab:green" if v > ACTIVE_THRESHOLD else "tab:red" for v in var]
    axes[1].bar(u, var, color=colors)
    axes[1].axhline(ACTIVE_THRESHOLD, color="k", ls="--", lw=1)
    axes[1].set_yscale("log")
    axes[1].set_title("Cov_x E_q[z_u]; active if > 0.01 (dashed)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("latent dimension u")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(fig)


def khat_figure(khat: np.ndarray) -> bytes:
    """Pareto k-hat per datapoint with the 0.5 and 0.7 thresholds."""
    fig, ax = plt.subplots(figsize=(6, 2.8))
    k = np.asarray(khat)
    colors = np.where(k > KHAT_BAD, "tab:red", np.where(k > KHAT_GOOD, "tab:orange", "tab:green"))
    ax.scatter(np.arange(k.size), k, s=6, c=colors)
    for t in (KHAT_GOOD, KHAT_BAD):
        ax.axhline(t, color="k", ls="--", lw=0.8)
    ax.set_xlabel("test datapoint")
    ax.set_ylabel("PSIS k-hat")
    ax.set_title("importance weights p(x,z)/q(z|x): k-hat per datapoint", fontsize=9)
    return _png(fig)


def posterior_overlay_figure(idata, dims: tuple[int, int] | int) -> bytes:
    """NUTS draws (gold standard) and q(z|x) draws per datapoint, on two latent dims (or one)."""
    post = idata.posterior["z"].stack(s=("chain", "draw")).transpose("s", "point", "latent").values
    var = (
        idata["variational"]["z"]
        .stack(s=("chain", "draw"))
        .transpose("s", "point", "latent")
        .values
    )
    points = idata.posterior["point"].values
    n = len(points)
    fig, axes = plt.subplots(1, n, figsize=(2.8 * n, 2.9), squeeze=False)
    for i, ax in enumerate(axes[0]):
        if isinstance(dims, int):
            bins = np.histogram_bin_edges(np.concatenate([post[:, i, dims], var[:, i, dims]]), 40)
            ax.hist(post[:, i, dims], bins, density=True, alpha=0.5, label="NUTS")
            ax.hist(var[:, i, dims], bins, density=True, alpha=0.5, label="q(z|x)")
            ax.set_xlabel(f"z[{dims}]")
        else:
            a, b = dims
            ax.scatter(post[:, i, a], post[:, i, b], s=3, alpha=0.3, label="NUTS")
            ax.scatter(var[:, i, a], var[:, i, b], s=3, alpha=0.3, label="q(z|x)")
            ax.set_xlabel(f"z[{a}]")
            ax.set_ylabel(f"z[{b}]")
        ax.set_title(f"test point {points[i]}", fontsize=9)
    axes[0][0].legend(fontsize=7, markerscale=3)
    return _png(fig)


def gap_figure(approximation: np.ndarray, amortization: np.ndarray) -> bytes:
    """Per-datapoint approximation and amortization gaps, stacked, sorted by total."""
    order = np.argsort(approximation + amortization)
    fig, ax = plt.subplots(figsize=(6, 2.8))
    u = np.arange(order.size)
    ax.bar(u, approximation[order], width=1.0, label="approximation gap log p̂(x) − ELBO(q*)")
    ax.bar(
        u,
        amortization[order],
        width=1.0,
        bottom=approximation[order],
        label="amortization gap ELBO(q*) − ELBO(q)",
    )
    ax.set_xlabel("datapoints (sorted)")
    ax.set_ylabel("nats")
    ax.legend(fontsize=7)
    return _png(fig)


def nuts_comparison_figure(n: dict[str, Any]) -> bytes:
    """Every (point, latent dimension) pair of the NUTS comparison in two panels: q's mean
    against NUTS's, in units of the NUTS posterior sd, and q's sd against NUTS's (log-log)."""
    nm, qm = np.asarray(n["nuts_mean"], float), np.asarray(n["q_mean"], float)
    ns, qs = np.asarray(n["nuts_sd"], float), np.asarray(n["q_sd"], float)
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    z = (qm - nm) / ns
    a.hist(z.ravel(), bins=min(40, max(10, z.size // 4)), color="#4a7")
    a.axvline(0, color="k", lw=1)
    a.set_xlabel("(mean of q − mean of NUTS) / sd of NUTS")
    a.set_ylabel("(point, dim) pairs")
    a.set_title("where q puts its mass", fontsize=9)
    b.loglog(ns.ravel(), qs.ravel(), ".", ms=4, alpha=0.7)
    lo, hi = float(min(ns.min(), qs.min())), float(max(ns.max(), qs.max()))
    b.plot([lo, hi], [lo, hi], "k--", lw=1, label="q as wide as the posterior")
    b.set_xlabel("posterior sd (NUTS)")
    b.set_ylabel("sd of q(z|x)")
    b.set_title("how wide q is (below the line: too narrow)", fontsize=9)
    b.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def code_variance_figure(var: np.ndarray) -> bytes:
    """Autoencoder code usage: variance of each code dimension over the test set."""
    fig, ax = plt.subplots(figsize=(min(max(5.0, 2 + 0.3 * var.size), 14), 2.8))
    ax.bar(np.arange(var.size), np.maximum(var, 1e-12))
    ax.axhline(ACTIVE_THRESHOLD, color="k", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("code dimension")
    ax.set_title("variance of each code over the test set", fontsize=9)
    return _png(fig)


def _overlay_dims(diag: Diagnosis) -> tuple[int, int] | int:
    var = np.asarray(diag.decomposition.posterior_mean_variance)
    if var.size == 1:
        return 0
    a, b = np.argsort(-var)[:2]
    return int(min(a, b)), int(max(a, b))


def make_figures(diag: Diagnosis) -> dict[str, bytes]:
    """All figures that apply to this diagnosis, as PNG bytes keyed by section name."""
    if diag.code_variance is not None:
        return {"code_usage": code_variance_figure(diag.code_variance.cpu().numpy())}
    figs: dict[str, bytes] = {}
    d = diag.results["decomposition"]
    figs["latent_usage"] = latent_usage_figure(d["kl_per_dim"], d["posterior_mean_variance"])
    if diag.khat is not None:
        figs["psis"] = khat_figure(diag.khat.numpy())
    if diag.idata is not None:
        figs["nuts"] = posterior_overlay_figure(diag.idata, _overlay_dims(diag))
    if "nuts" in diag.results:
        figs["nuts_comparison"] = nuts_comparison_figure(diag.results["nuts"])
    if diag.gap is not None:
        figs["amortization"] = gap_figure(
            diag.gap.approximation_gap.cpu().numpy(), diag.gap.amortization_gap.cpu().numpy()
        )
    return figs


# --------------------------------------------------------------------------------------- HTML
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.verdict{background:#f6f8fa;border-left:4px solid #4a7;padding:.5rem 1rem}
img{max-width:100%}pre{background:#f6f8fa;padding:.5rem;overflow:auto;font-size:.8rem}code{font-size:.9em}
"""


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return html.escape(str(v))


def _table(head: list[str], rows: list[list[Any]], digits: int = 3) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_f(c, digits)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _summary(r: dict[str, Any]) -> str:
    ll, el = r["log_likelihood"], r["elbo"]
    rows = [
        [f"log-likelihood, importance sampled (IWAE, K={ll['samples']})", ll["mean"], ll["se"]],
        ["ELBO (1 sample per datapoint)", el["mean"], el["se"]],
        ["IWAE − ELBO", r["bound_gap"], None],
        ["reconstruction error (SSE per datapoint)", r["reconstruction_error"], None],
    ]
    return _table(["quantity (test split, nats per datapoint)", "mean", "std. error"], rows)


def _decomposition(d: dict[str, Any]) -> str:
    rows = [
        ["ELBO = reconstruction − KL", d["elbo"]],
        ["reconstruction E_q[log p(x|z)]", d["reconstruction"]],
        ["KL(q(z|x) || p(z)) — " + d["kl_method"], d["kl"]],
        ["mutual information I(x;z)", d["mutual_information"]],
        ["aggregate KL(q(z) || p(z))", d["aggregate_kl"]],
        ["log N (ceiling of the I(x;z) estimate)", d["log_n"]],
        ["KL − I − aggregate KL (surgery residual)", d["surgery_residual"]],
        ["active units", f"{d['active_units']} of {d['latent_dim']}"],
    ]
    per = [
        [u, kl, v, "yes" if v > ACTIVE_THRESHOLD else "no"]
        for u, (kl, v) in enumerate(
            zip(
                d["kl_per_dim"] or [None] * d["latent_dim"],
                d["posterior_mean_variance"],
                strict=True,
            )
        )
    ]
    return (
        _table(["term", "nats per datapoint"], rows)
        + f"<p>KL per dimension: {html.escape(d['kl_per_dim_method'])}.</p>"
        + _table(["latent dim u", "mean KL (nats)", "Cov_x E_q[z_u]", "active"], per, 4)
    )


def _nuts(n: dict[str, Any], figures: dict[str, bytes]) -> str:
    rows = []
    for i, p in enumerate(n["points"]):
        for u in range(len(n["nuts_mean"][i])):
            rows.append(
                [
                    p,
                    u,
                    n["nuts_mean"][i][u],
                    n["q_mean"][i][u],
                    n["nuts_sd"][i][u],
                    n["q_sd"][i][u],
                    n["rhat"][i][u],
                    n["ess_bulk"][i][u],
                ]
            )
    head = ["point", "dim", "NUTS mean", "q mean", "NUTS sd", "q sd", "R-hat", "ESS (bulk)"]
    intro = (
        f"<p>{n['chains']} chains ({n['chain_method']}), {n['warmup']} warm-up + {n['draws']} draws each; "
        f"{n['divergences']} divergent transitions; max R-hat {_f(n['max_rhat'])}, min ESS {_f(n['min_ess'], 0)}.</p>"
    )
    return (
        intro
        + _img(figures.get("nuts_comparison"), "q against NUTS, every point and dimension")
        + f"<details><summary>the {len(rows)} (point, dimension) rows</summary>"
        + _table(head, rows)
        + "</details>"
    )


def _amortization(a: dict[str, Any]) -> str:
    rows = [
        [k.replace("_", " "), a[k], a.get(k + "_se")]
        for k in ("log_px", "elbo_qstar", "elbo_q", "approximation_gap", "amortization_gap")
    ]
    rows.append(["inference gap (total)", a["inference_gap"], None])
    return (
        f"<p>{a['points']} test points; q* = per-datapoint {a['family']} Gaussian, {a['steps']} Adam steps from the encoder's output.</p>"
        + _table(["quantity", "mean (nats)", "std. error"], rows)
    )


_EXPLAIN = {
    "decomposition": "ELBO = E_q[log p(x|z)] − KL(q(z|x)||p(z)); ELBO surgery: mean KL = I(x;z) + KL(q(z)||p(z)) with q(z) the average of q(z|x) over the test points. A latent dimension is active when the variance over x of its posterior mean exceeds 0.01.",
    "psis": "Pareto k-hat of the importance weights p(x,z)/q(z|x), per datapoint: < 0.5 good, 0.5–0.7 usable, > 0.7 the IS estimate of log p(x) is unreliable (q misses posterior mass).",
    "nuts": "A gold-standard posterior p(z|x) by NUTS for a few test points, against draws of q(z|x). q fitted by KL(q||p) tends to be too narrow (sd ratio < 1).",
    "amortization": "Cremer et al. (2018): log p(x) − ELBO(q) = [log p(x) − ELBO(q*)] + [ELBO(q*) − ELBO(q)], q* the best member of q's family for each datapoint (the encoder's shortfall is the amortization gap).",
}


#: verdict -> (section of this report, anchor of the docs page `diagnostics`) explaining it
_WHY = {
    "collapse": ("decomposition", "elbo-decomposition"),
    "psis": ("psis", "psis-khat"),
    "bound": ("psis", "log-likelihood-iwae-bound"),
    "nuts": ("nuts", "gold-standard-nuts"),
    "amortization": ("amortization", "gaps"),
}


def _why(verdict: str, docs_url: str | None) -> str:
    """Links from a verdict to the section of the report, and of the docs, that explain it."""
    section, anchor = _WHY.get(verdict, (None, None))
    if section is None:
        return ""
    docs = (
        f" · <a href='{html.escape(docs_url.rstrip('/'))}/diagnostics/#{anchor}'>docs</a>"
        if docs_url
        else f" · docs: <code>docs/diagnostics.md#{anchor}</code>"
    )
    return f"<span class='why'>(<a href='#{section}'>what this means</a>{docs})</span>"


def render_html(
    diag: Diagnosis, figures: dict[str, bytes] | None = None, docs_url: str | None = None
) -> str:
    """The report as one HTML string (figures embedded). Each verdict links to the section of
    the report that explains it and to that section of the docs page *Diagnostics*: at
    `docs_url` (the address of a built docs site, e.g. `file:///path/to/site`) when given."""
    r = diag.results
    figs = figures if figures is not None else make_figures(diag)
    parts = [
        f"<h1>pyrovae diagnose: {html.escape(Path(r['run']).name)}</h1>",
        f"<p>Run folder <code>{html.escape(r['run'])}</code>, {r['points']} test datapoints.</p>",
    ]
    if r["kind"] == "ae":
        parts += [
            "<h2>Autoencoder run</h2>",
            f"<p class='verdict'>{html.escape(r['not_applicable'])}</p>",
            _table(
                ["quantity", "value"],
                [
                    ["reconstruction error (SSE per datapoint)", r["reconstruction_error"]],
                    ["codes used (variance > 0.01)", f"{r['codes_used']} of {r['latent_dim']}"],
                ],
            ),
            _img(figs.get("code_usage"), "code usage"),
        ]
    else:
        parts += [
            f"<p>Model: {html.escape(json.dumps(r['model']))}; binarize = {html.escape(str(r['binarize']))}. {html.escape(r['units'])}.</p>",
            "<h2>Summary</h2>",
            _summary(r),
            "<h2>Verdicts</h2>",
        ]
        parts += [
            f"<p class='verdict'><b>{html.escape(k)}</b>: {html.escape(v)} {_why(k, docs_url)}</p>"
            for k, v in r["verdicts"].items()
        ]
        sections = [
            (
                "decomposition",
                "ELBO decomposition and latent usage",
                _decomposition(r["decomposition"]),
                "latent_usage",
            )
        ]
        p = r["psis"]
        sections.append(
            (
                "psis",
                "PSIS k-hat",
                _table(
                    [
                        "samples per datapoint",
                        "points",
                        "k̂ < 0.5",
                        "0.5 ≤ k̂ ≤ 0.7",
                        "k̂ > 0.7",
                        "median",
                        "max",
                    ],
                    [
                        [
                            p["samples"],
                            p["n"],
                            p["share_below_0.5"],
                            p["share_0.5_to_0.7"],
                            p["share_above_0.7"],
                            p["median"],
                            p["max"],
                        ]
                    ],
                ),
                "psis",
            )
        )
        if "nuts" in r:
            sections.append(
                ("nuts", "Gold standard: NUTS vs q(z|x)", _nuts(r["nuts"], figs), "nuts")
            )
        if "amortization" in r:
            sections.append(
                (
                    "amortization",
                    "Amortization and approximation gaps",
                    _amortization(r["amortization"]),
                    "amortization",
                )
            )
        for key, title, body, fig in sections:
            parts += [
                f"<h2 id='{key}'>{html.escape(title)}</h2>",
                f"<p>{html.escape(_EXPLAIN[key])}</p>",
                body,
                _img(figs.get(fig), title),
            ]
        parts.append(
            "<h2>Timings</h2>"
            + _table(["step", "seconds"], [[k, v] for k, v in r["seconds"].items()], 1)
        )
    parts.append(
        f"<h2>All numbers (JSON)</h2><details><summary>show</summary><pre>{html.escape(json.dumps(r, indent=1))}</pre></details>"
    )
    body = "\n".join(parts)
    return f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>pyrovae diagnose</title><style>{CSS}</style></head><body>\n{body}\n</body></html>\n"


def write_report(diag: Diagnosis, path: str | Path, docs_url: str | None = None) -> Path:
    """Write `render_html` to `path` (atomically) and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(render_html(diag, docs_url=docs_url), encoding="utf-8")
    tmp.replace(out)
    return out
