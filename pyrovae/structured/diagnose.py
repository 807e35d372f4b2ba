r"""`pyrovae diagnose` on a structured model: the diagnostics that apply to any Pyro program.

What runs (test split, nats per datapoint):

* the IWAE log-likelihood and the single-sample ELBO (`pyrovae.evaluate`), discrete sites
  summed out exactly inside each importance weight (`log_weights_summed`);
* PSIS $\hat k$ of those weights (Vehtari et al. 2024): is the guide a usable proposal for
  $p(x)$ (the discrete part is summed, so $\hat k$ judges the continuous part);
* for every continuous latent site with a diagonal Normal guide and a diagonal Normal model
  density: the KL per dimension, Monte Carlo
  $E_{q}\big[\log q(z_d \mid \cdot) - \log p(z_d \mid \cdot)\big]$ with the other variables
  (a class $y$, a component $c$, a parent layer) drawn from the guide, and the active units
  (Burda et al. 2016: $\mathrm{Cov}_x\, E_q[z_d \mid x] > 0.01$);
* the NUTS comparison on the continuous latents (`nuts_section`): NUTS draws of the exact
  posterior of all continuous sites jointly for a few test points, the discrete sites summed
  out by Pyro's enumeration (M2: $p(z \mid x) = \sum_y p(z, y \mid x)$, gmvae:
  $\sum_c p(z, c \mid x)$, hvae: $p(z_1, \dots, z_L \mid x)$, cvae: $p(z \mid x, c)$ at a fixed
  condition), against the guide's marginal draws (discrete sites sampled from the guide):
  R-hat, bulk ESS, standardized mean difference and sd ratio per site.

What does not run, and why (`not_applicable` in the results): the amortization gap frees
the Gaussian parameters of a single site $q(z \mid x)$ per datapoint, which a guide with a
discrete variable or several layers does not have; the ELBO decomposition into I(x;z) and
KL(q(z)||p(z)) assumes the prior $p(z)$ without a parent.
"""

from __future__ import annotations

from typing import Any

import pyro
import pyro.distributions as dist
import torch

from pyrovae.diagnostics import (
    ACTIVE_THRESHOLD,
    DiagnoseOptions,
    Diagnosis,
    DiagnosticsError,
    _pick_points,
    _subset,
    compare_posteriors,
    guide_site_draws,
    khat_from_log_weights,
    khat_summary,
    nuts_posterior,
    sites_inference_data,
)
from pyrovae.distributed import per_point, rank
from pyrovae.evaluate import (
    elbo,
    enumerated_sites,
    is_scored,
    log_likelihood,
    log_weights_summed,
    mean_and_se,
    vectorized_traces,
)

NOT_APPLICABLE = (
    "not run for structured models: the amortization gap (it frees the parameters of one "
    "Gaussian q(z|x) per datapoint; this guide has a discrete variable or several latent "
    "layers), and the ELBO decomposition into I(x;z) and KL(q(z)||p(z)) (it assumes a prior "
    "p(z) without parents)."
)


NO_LATENT = (
    "not run: this model has no latent variable (its guide samples nothing), so its "
    "log-likelihood is exact and equals the ELBO; PSIS k-hat, the KL per dimension, NUTS, the "
    "amortization gap and the ELBO decomposition do not apply."
)


def _has_latent(guide, x: torch.Tensor, kw: dict) -> bool:
    """Whether the guide samples any latent site (a `cvae_baseline` samples none)."""
    with pyro.poutine.block(), torch.no_grad():
        g = pyro.poutine.trace(guide).get_trace(x, **kw)
    return any(is_scored(s) and not s["is_observed"] for s in g.nodes.values())


def _labels(model, y: torch.Tensor | None) -> dict:
    return {"y": y} if y is not None and getattr(model, "conditions_on_labels", False) else {}


def _diag_normal(fn: dist.Distribution) -> dist.Distribution | None:
    while isinstance(fn, dist.Independent):
        fn = fn.base_dist
    return fn if isinstance(fn, dist.Normal) else None


@torch.no_grad()
def kl_per_dimension(model, guide, x: torch.Tensor, samples: int = 16, **kwargs) -> dict[str, Any]:
    """KL per dimension and active units of every continuous latent site with diagonal Normal
    guide and model densities, `{site: {"kl_per_dim", "kl", "active_units", "dim"}}`."""
    g, m, _ = vectorized_traces(model, guide, x, samples, **kwargs)
    out: dict[str, Any] = {}
    for name, site in g.nodes.items():
        if not is_scored(site) or site["is_observed"] or name not in m.nodes:
            continue
        q, p = _diag_normal(site["fn"]), _diag_normal(m.nodes[name]["fn"])
        if q is None or p is None:
            continue
        z = site["value"]
        kl = (q.log_prob(z) - p.log_prob(z)).reshape(-1, z.shape[-1]).mean(0)
        means = q.mean.expand_as(z).mean(0)  # E_q[z | x], the other variables averaged out
        var = means.reshape(-1, z.shape[-1]).var(0)
        out[name] = {
            "dim": int(z.shape[-1]),
            "kl_per_dim": kl.tolist(),
            "kl": float(kl.sum()),
            "active_units": int((var > ACTIVE_THRESHOLD).sum()),
            "posterior_mean_variance": var.tolist(),
        }
    return out


def _condition(model, y: torch.Tensor | None) -> tuple[dict[str, Any], str]:
    """What NUTS and the guide condition on besides x, and its description."""
    if getattr(model, "conditions_on_labels", False):
        return {"y": y}, "x and its label y"
    if getattr(model, "condition", None) == "quadrants":
        given = sorted(model.given)[len(model.given) // 2]
        return {"given": given}, f"the {given} given quadrant(s) of x (the missing pixels observed)"
    return {}, "x"


RHAT_OK = 1.05  # split R-hat above this: the chains disagree


def _nuts_verdict(sites: dict[str, dict], unconverged: list[int]) -> str:
    """One sentence per site on q against NUTS, and whether the chains can be trusted."""
    words = []
    for name, c in sites.items():
        r = c["mean_sd_ratio"]
        width = "too narrow" if r < 0.9 else "too wide" if r > 1.1 else "about as wide"
        words.append(
            f"{name}: q is {width} (sd ratio q/NUTS {r:.2f}), its means "
            f"{c['mean_abs_std_mean_diff']:.2f} NUTS sds off"
        )
    trust = (
        "the chains agree (R-hat <= 1.05 everywhere)"
        if not unconverged
        else f"the chains disagree at test points {unconverged} (R-hat > {RHAT_OK}): a "
        "multimodal posterior (the chains sit in different modes) or too short a run "
        "(raise --nuts-warmup); read those points' figures with care"
    )
    return "; ".join(words) + "; " + trust + "."


def nuts_section(run, x_all: torch.Tensor, o: DiagnoseOptions) -> dict[str, Any]:
    """NUTS draws of the exact posterior of every continuous latent site (discrete sites
    summed out) for `o.points` test points, compared per site with the guide's marginal."""
    model = run.model
    ids = _pick_points(x_all.shape[0], o.points, o.seed)
    idx = torch.tensor(ids, device=x_all.device)
    xs = x_all[idx]
    y_test = run.data.y_test
    kw, on = _condition(model, None if y_test is None else y_test.to(x_all.device)[idx])
    q = guide_site_draws(model.guide, xs, o.nuts_samples * o.chains, **kw)
    if not q:
        return {"skipped": "the guide has no continuous latent site: nothing to compare"}
    args = (model.model, xs, o.nuts_samples, o.nuts_warmup, o.chains)
    opts = {"site": None, "seed": o.seed, "model_kwargs": kw}
    try:
        nuts = nuts_posterior(*args, jit=True, **opts)
    except Exception:  # noqa: BLE001 - a model that does not trace runs without the JIT
        try:
            nuts = nuts_posterior(*args, **opts)
        except DiagnosticsError as e:  # e.g. a user's site without one row per datapoint
            return {"skipped": str(e)}
    idata = sites_inference_data(nuts.sites, q, xs, point_ids=ids)
    sites = {k: compare_posteriors(idata, k) for k in nuts.sites}
    discrete = enumerated_sites(model.model, model.guide, xs[:1], **{
        k: (v[:1] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()
    })
    unconverged = sorted(
        {
            ids[i]
            for c in sites.values()
            for i, row in enumerate(c["rhat"])
            if max(row) > RHAT_OK
        }
    )
    return {
        "verdict": _nuts_verdict(sites, unconverged),
        "unconverged_points": unconverged,
        "chains": o.chains,
        "draws": o.nuts_samples,
        "warmup": o.nuts_warmup,
        "divergences": nuts.divergences,
        "jit": nuts.jit,
        "seconds": nuts.seconds,
        "points": ids,
        "conditioned_on": on,
        "summed_out": list(discrete),
        "target": "the exact posterior of all continuous latent sites jointly"
        + (f", {', '.join(discrete)} summed out by enumeration" if discrete else ""),
        "guide": "draws of the guide's marginal over the continuous sites"
        + (f" ({', '.join(discrete)} sampled from the guide)" if discrete else ""),
        "max_rhat": max(c["max_rhat"] for c in sites.values()),
        "min_ess": min(c["min_ess"] for c in sites.values()),
        "mean_sd_ratio": sum(c["mean_sd_ratio"] for c in sites.values()) / len(sites),
        "sites": sites,
    }


def diagnose_structured(run, x_all: torch.Tensor, o: DiagnoseOptions) -> Diagnosis:
    """The diagnostics of a structured model that apply (see the module docstring)."""
    model = run.model
    device = x_all.device
    y_all = run.data.y_test.to(device) if run.data.y_test is not None else None
    idx = torch.arange(x_all.shape[0])
    sub = _subset(idx, o.max_points, o.seed)
    x, y = x_all[sub.to(device)], (None if y_all is None else y_all[sub.to(device)])
    pyro.set_rng_seed(o.seed)
    xi_idx = _subset(idx, o.iwae_points, o.seed + 3).to(device)
    xi, yi = x_all[xi_idx], (None if y_all is None else y_all[xi_idx])

    def labelled(fn, xs: torch.Tensor, ys: torch.Tensor | None):
        """`fn(x, kw)` per datapoint, sharded over the ranks under `torch.distributed`."""
        return per_point(
            lambda i: fn(xs[i], _labels(model, None if ys is None else ys[i])),
            torch.arange(xs.shape[0], device=xs.device),
        )

    ll = labelled(
        lambda xb, kw: log_likelihood(model.model, model.guide, xb, o.iwae_samples, y=kw.get("y")),
        xi, yi,
    )
    el = labelled(
        lambda xb, kw: elbo(model.model, model.guide, xb, 1, batch_size=1024, y=kw.get("y")),
        xi, yi,
    )
    (ll_mean, ll_se), (el_mean, el_se) = mean_and_se(ll), mean_and_se(el)
    kw = _labels(model, y)
    sites = enumerated_sites(model.model, model.guide, x[:1], **_labels(model, None if y is None else y[:1]))

    def khat_of(xs: torch.Tensor, kw_s: dict) -> torch.Tensor:
        ys = kw_s.get("y")
        lw = []
        with torch.no_grad():
            for j in range(0, xs.shape[0], 64):
                yb = None if ys is None else ys[j : j + 64]
                lw.append(log_weights_summed(
                    model.model, model.guide, xs[j : j + 64], o.khat_samples, sites,
                    **_labels(model, yb),
                ))
        return khat_from_log_weights(torch.cat(lw, 1))

    latent = _has_latent(model.guide, x[:1], _labels(model, None if y is None else y[:1]))
    khat = labelled(khat_of, x, y) if latent else None
    summed = ", ".join(sites) or "none"
    res: dict[str, Any] = {
        "kind": run.config.model.kind,
        "structured": True,
        "run": str(run.dir),
        "split": "test",
        "binarize": run.config.data.binarize,
        "points": int(x_all.shape[0]),
        "units": "nats per datapoint (ELBO and log-likelihood: higher is better)",
        "log_likelihood": {
            "mean": ll_mean,
            "se": ll_se,
            "samples": o.iwae_samples,
            "points": int(xi.shape[0]),
            "of": getattr(model, "log_likelihood_of", "log p(x)"),
            "estimator": f"importance sampling (IWAE bound), discrete sites summed exactly: {summed}",
        },
        "elbo": {"mean": el_mean, "se": el_se, "particles": 1, "points": int(xi.shape[0])},
        "bound_gap": ll_mean - el_mean,
        "psis": {"samples": o.khat_samples, **khat_summary(khat)} if latent else None,
        "not_applicable": NOT_APPLICABLE if latent else NO_LATENT,
    }
    if not latent:
        res["log_likelihood"]["estimator"] = "exact (no latent variable: every weight is p(x))"
        return Diagnosis(results=res)
    if rank() == 0:  # under torch.distributed: the sharded estimates above on every rank
        res["latent_sites"] = kl_per_dimension(model.model, model.guide, x, **kw)
        if o.points > 0:
            res["nuts"] = nuts_section(run, x_all, o)
    return Diagnosis(results=res, khat=khat)
