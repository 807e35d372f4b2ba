r"""Posterior diagnostics: how good is $q(z \mid x)$, did the posterior collapse, how tight is the bound.

Generic estimators take any Pyro `(model, guide)` pair whose per-datapoint sites sit inside
`pyro.plate("data", N)` with **one** latent sample site (`"z"` in a pyrovae VAE) and return
per-datapoint values in nats:

* `psis_khat` — Pareto $\hat k$ of the importance weights $p(x, z)/q(z \mid x)$ per datapoint
  (Vehtari et al. 2024, via `arviz_stats`' PSIS); `khat_summary` gives the shares
  $\hat k < 0.5$ (good), $0.5 \le \hat k \le 0.7$ (usable), $\hat k > 0.7$ (q is a poor proposal).
* `elbo_decomposition` — $\mathrm{ELBO} = E_q[\log p(x\mid z)] - \mathrm{KL}(q(z\mid x)\|p(z))$,
  KL per latent dimension, active units (Burda et al. 2016), mutual information $I(x;z)$ and
  the aggregate-posterior KL from ELBO surgery (Hoffman & Johnson 2016):
  $\frac1N\sum_n \mathrm{KL}(q(z\mid x_n)\|p(z)) = I(x;z) + \mathrm{KL}(q(z)\|p(z))$,
  and `collapse_verdict` in plain words.
* `nuts_posterior` / `to_inference_data` / `compare_posteriors` — a gold-standard
  posterior $p(z\mid x)$ by NUTS for a few datapoints next to draws of $q(z\mid x)$, in one
  ArviZ 1.x `xarray.DataTree` (groups `posterior` = NUTS, `variational` = q); R-hat and ESS
  from `arviz_stats`.
* `amortization_gap` — Cremer et al. (2018): $\log p(x) - \mathrm{ELBO}(q)$ splits into the
  approximation gap $\log p(x) - \mathrm{ELBO}(q^*)$ and the amortization gap
  $\mathrm{ELBO}(q^*) - \mathrm{ELBO}(q)$, $q^*$ the best per-datapoint member of q's family.

`diagnose_run` runs all of them on a trained run (what `pyrovae diagnose` prints).

References:
    Y. Burda, R. Grosse, R. Salakhutdinov (2016), *Importance weighted autoencoders*, ICLR.
    M. D. Hoffman, M. J. Johnson (2016), *ELBO surgery: yet another way to carve up the
    variational evidence lower bound*, NIPS Workshop on Advances in Approximate Bayesian Inference.
    C. Cremer, X. Li, D. Duvenaud (2018), *Inference suboptimality in variational autoencoders*, ICML.
    A. Vehtari, D. Simpson, A. Gelman, Y. Yao, J. Gabry (2024), *Pareto smoothed importance
    sampling*, JMLR 25(72).
    M. D. Hoffman, A. Gelman (2014), *The No-U-Turn sampler*, JMLR 15.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch.distributions import (
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
    TransformedDistribution,
    kl_divergence,
)

from pyrovae.errors import PyroVAEError
from pyrovae.evaluate import (
    MAX_ROWS,
    data_plate_dim,
    elbo,
    evaluation_mode,
    is_scored,
    log_likelihood,
    log_weights,
    log_weights_with_grad,
    mean_and_se,
    reconstruction_error,
    site_log_prob,
    trace_log_prob,
    vectorized_traces,
)
from pyrovae.progress import bar, log, show_bars

if TYPE_CHECKING:
    import xarray as xr

    from pyrovae.runs import Run

ACTIVE_THRESHOLD = 0.01
r"""$\mathrm{Cov}_x E_q[z_u \mid x]$ above this marks latent dimension $u$ as active
(Burda et al. 2016)."""
MI_COLLAPSE = 0.05
"""$I(x;z)$ below this many nats counts as collapsed whatever the active-unit count."""
# PSIS k-hat thresholds (Vehtari et al. 2024).
KHAT_GOOD, KHAT_BAD = 0.5, 0.7


class DiagnosticsError(PyroVAEError, ValueError):
    """A diagnostic does not apply to this model/guide (e.g. several latent sites)."""


# ------------------------------------------------------------------------------------- helpers
def _latent_site(trace) -> str:
    names = [n for n, s in trace.nodes.items() if is_scored(s) and not s["is_observed"]]
    if len(names) != 1:
        raise DiagnosticsError(
            f"this diagnostic needs a guide with exactly one latent sample site; found {names}"
        )
    return names[0]


def _plain_guide_site(guide, x: torch.Tensor) -> tuple[str, dist.Distribution]:
    """The latent site's name and q(z|x) with batch shape `(N,)` from one guide call."""
    with poutine.block(), torch.no_grad():
        g = poutine.trace(guide).get_trace(x)
    name = _latent_site(g)
    return name, g.nodes[name]["fn"]


def _subset(x: torch.Tensor, max_points: int | None, seed: int) -> torch.Tensor:
    if max_points is None or x.shape[0] <= max_points:
        return x
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_points]
    return x[idx.sort().values.to(x.device)]


def log_weights_chunked(
    model, guide, x: torch.Tensor, num_samples: int, max_rows: int = MAX_ROWS
) -> torch.Tensor:
    """All log weights `(num_samples, N)`, computed in chunks of about `max_rows` rows."""
    b = max(1, min(x.shape[0], max_rows // num_samples))
    out = []
    progress = bar(total=x.shape[0], desc=f"PSIS log weights, K={num_samples}", unit="pt")
    for xb in x.split(b):
        k_chunk = max(1, max_rows // xb.shape[0])
        parts = [
            log_weights(model, guide, xb, min(k_chunk, num_samples - s))
            for s in range(0, num_samples, k_chunk)
        ]
        out.append(torch.cat(parts, 0))
        progress.update(xb.shape[0])
    progress.close()
    return torch.cat(out, 1)


# ---------------------------------------------------------------------------------------- PSIS
#: PSIS fits the Pareto tail to the largest min(K/5, 3 sqrt(K)) weights and needs at least 5 of
#: them (Vehtari et al. 2024): K >= 25 importance samples per datapoint
KHAT_MIN_SAMPLES = 25


def khat_from_log_weights(lw: torch.Tensor) -> torch.Tensor:
    r"""Pareto $\hat k$ per datapoint from log weights $\log w = \log p(x,z) - \log q(z\mid x)$,
    `(K, N)`, via `arviz_stats.base.array_stats.psislw` (ArviZ 1.x).

    **Sign.** ArviZ 1.x's `psislw` smooths the right tail of the **negated** input (it is
    written for PSIS-LOO, whose callers pass log-likelihoods, $\log r = -\log p$): it fits
    the Pareto tail to $-\text{input}$. The importance ratios here are $w$, so we pass
    $-\log w$ and it smooths $\log w$. (ArviZ 0.x's `az.psislw` took $\log w$ itself: the
    sign flipped between the two.) Passing $\log w$ would fit the *left* tail, the small
    weights, and call a too-narrow q good; `tests/test_diagnostics.py` checks both on a
    closed form. Draws go on the **last** axis, hence the transpose to `(N, K)`.
    """
    from arviz_stats.base import array_stats

    if lw.shape[0] < KHAT_MIN_SAMPLES:
        raise ValueError(
            f"PSIS k-hat: expected at least {KHAT_MIN_SAMPLES} importance samples per datapoint "
            f"(the Pareto tail needs 5 of the largest K/5 weights), got {lw.shape[0]}"
        )
    arr = lw.detach().double().cpu().numpy().T
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, k = array_stats.psislw(-arr, r_eff=1.0, axis=-1)
    return torch.as_tensor(np.asarray(k, dtype=np.float64))


def psis_khat(model, guide, x: torch.Tensor, num_samples: int = 1000) -> torch.Tensor:
    r"""Pareto-smoothed importance sampling $\hat k$ of $w = p(x,z)/q(z\mid x)$, `(N,)`.

    $\hat k$ is the fitted shape of a generalized Pareto distribution to the largest
    weights. $\hat k < 0.5$: the weights have finite variance, q is a good proposal;
    $0.5 \le \hat k \le 0.7$: usable, slower convergence; $\hat k > 0.7$: the
    importance sampling estimate of $\log p(x)$ (and so `log_likelihood`)
    is unreliable — q(z|x) misses mass of p(z|x), typically because it is too narrow
    (Vehtari et al. 2024; Yao et al. 2018 for variational inference).

    Under `torch.distributed` (`torchrun ... pyrovae diagnose`) each rank computes the
    weights and $\hat k$ of its shard of the datapoints (`pyrovae.distributed.per_point`) and
    every rank gets all $N$ values, in order.
    """
    from pyrovae import distributed

    return distributed.per_point(
        lambda xs: khat_from_log_weights(log_weights_chunked(model, guide, xs, num_samples)), x
    )


def khat_summary(khat: torch.Tensor) -> dict[str, float | int]:
    """Shares of datapoints with k-hat < 0.5, in [0.5, 0.7], > 0.7 (plus median and max)."""
    k = torch.as_tensor(khat, dtype=torch.float64)
    n = int(k.numel())
    share = lambda m: float(m.sum()) / n if n else float("nan")  # noqa: E731
    return {
        "n": n,
        "share_below_0.5": share(k < KHAT_GOOD),
        "share_0.5_to_0.7": share((k >= KHAT_GOOD) & (k <= KHAT_BAD)),
        "share_above_0.7": share(k > KHAT_BAD),
        "median": float(k.nanmedian()) if n else float("nan"),
        "max": float(k.max()) if n else float("nan"),
    }


# ------------------------------------------------------------------------- ELBO decomposition
def marginals(d: dist.Distribution) -> dist.Distribution | None:
    r"""Univariate marginals of a distribution over $z \in \mathbb R^d$ as a batch `(..., d)`.

    Closed forms for a diagonal Normal, a MultivariateNormal and a mixture of those; `None`
    otherwise (e.g. a flow).
    """
    if (
        isinstance(d, Independent)
        and d.reinterpreted_batch_ndims == 1
        and isinstance(d.base_dist, Normal)
    ):
        return dist.Normal(d.base_dist.loc, d.base_dist.scale)
    if isinstance(d, MultivariateNormal):
        return dist.Normal(d.loc, d.variance.sqrt())
    if isinstance(d, MixtureSameFamily):
        comp = marginals(d.component_distribution)  # batch (..., C, d)
        if comp is None:
            return None
        loc, scale = comp.loc.transpose(-1, -2), comp.scale.transpose(-1, -2)  # (..., d, C)
        logits = d.mixture_distribution.logits.unsqueeze(-2).expand(loc.shape)
        return dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(loc, scale))
    return None


def _is_diagonal(d: dist.Distribution) -> bool:
    return (
        isinstance(d, Independent)
        and isinstance(d.base_dist, Normal)
        and d.reinterpreted_batch_ndims == 1
    )


@dataclass
class ELBODecomposition:
    r"""The pieces of the ELBO of a (model, guide) pair on a batch; per-datapoint tensors are `(N,)`.

    `elbo = reconstruction - kl` per datapoint; `kl_per_dim` is `(N, d)` or `None`.
    """

    reconstruction: torch.Tensor
    kl: torch.Tensor
    kl_method: str
    kl_per_dim: torch.Tensor | None
    kl_per_dim_method: str
    posterior_mean_variance: torch.Tensor
    mutual_information: float
    aggregate_kl: float
    mi_points: int
    latent_dim: int
    verdict: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def elbo(self) -> torch.Tensor:
        return self.reconstruction - self.kl

    @property
    def active(self) -> torch.Tensor:
        """Boolean `(d,)`: $\\mathrm{Cov}_x E_q[z_u|x] > 0.01$."""
        return self.posterior_mean_variance > ACTIVE_THRESHOLD

    @property
    def active_units(self) -> int:
        return int(self.active.sum())

    def to_dict(self) -> dict[str, Any]:
        kl_dim = self.kl_per_dim.mean(0).tolist() if self.kl_per_dim is not None else None
        return {
            "points": int(self.kl.numel()),
            "elbo": float(self.elbo.mean()),
            "reconstruction": float(self.reconstruction.mean()),
            "kl": float(self.kl.mean()),
            "kl_method": self.kl_method,
            "kl_per_dim": kl_dim,
            "kl_per_dim_method": self.kl_per_dim_method,
            "active_units": self.active_units,
            "latent_dim": self.latent_dim,
            "posterior_mean_variance": self.posterior_mean_variance.tolist(),
            "mutual_information": self.mutual_information,
            "aggregate_kl": self.aggregate_kl,
            "mi_points": self.mi_points,
            "log_n": math.log(self.mi_points),
            "surgery_residual": float(self.kl.mean()) - self.mutual_information - self.aggregate_kl,
            "verdict": self.verdict,
            "notes": list(self.notes),
            "units": "nats per datapoint",
        }


def _kl_total(q, p, log_q: torch.Tensor, log_p: torch.Tensor) -> tuple[torch.Tensor, str]:
    try:
        kl = kl_divergence(q, p)
        return kl.reshape(-1, log_q.shape[-1])[0], "analytic (torch.distributions.kl_divergence)"
    except NotImplementedError:
        return (log_q - log_p).mean(0), f"Monte Carlo ({log_q.shape[0]} draws per datapoint)"


def _kl_per_dim(q, p, z: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    qm, pm = marginals(q), marginals(p)
    if qm is None:
        return (
            None,
            "not available: q(z|x) has no closed-form per-dimension marginals (e.g. a flow)",
        )
    if pm is None:
        return (
            None,
            "not available: p(z) has no closed-form per-dimension marginals (e.g. a flow prior)",
        )
    exact = _is_diagonal(q) and _is_diagonal(p)
    note = "" if exact else "; their sum is not the total KL when q or p is not factorized"
    try:
        kl = kl_divergence(qm, pm)
        return kl.reshape(-1, *kl.shape[-2:])[0], "analytic, KL(q(z_u|x) || p(z_u))" + note
    except NotImplementedError:
        kl = (qm.log_prob(z) - pm.log_prob(z)).mean(0)
        return (
            kl,
            f"Monte Carlo ({z.shape[0]} draws), KL(q(z_u|x) || p(z_u)) of the marginals" + note,
        )


def _posterior_means(q, z: torch.Tensor) -> torch.Tensor:
    try:
        m = q.mean
        return m.reshape(-1, *z.shape[1:])[0]
    except NotImplementedError:
        return z.mean(0)


@torch.no_grad()
def mutual_information(
    q_plain: dist.Distribution, z: torch.Tensor, log_q: torch.Tensor, log_p: torch.Tensor
) -> tuple[float, float]:
    r"""ELBO surgery (Hoffman & Johnson 2016) with the full-data mixture as $q(z)$.

    With $q(z) = \frac1N \sum_m q(z\mid x_m)$ and draws $z_{kn} \sim q(z\mid x_n)$:

    $$
    \hat I = \frac1{KN}\sum_{k,n} \log q(z_{kn}\mid x_n) - \log q(z_{kn}),
    \qquad \widehat{\mathrm{KL}}(q(z)\|p(z)) = \frac1{KN}\sum_{k,n} \log q(z_{kn}) - \log p(z_{kn}).
    $$

    Since the mixture contains $q(z\mid x_n)/N$, $\hat I \le \log N$ always.
    `q_plain` has batch shape `(N,)`; `z` is `(K, N, d)`; `log_q`, `log_p` `(K, N)`.
    """
    n = z.shape[1]
    flat = z.reshape(-1, 1, z.shape[-1])
    rows = max(1, (1 << 20) // n)
    log_mix = torch.cat([q_plain.log_prob(c).logsumexp(-1) for c in flat.split(rows)])
    log_qz = log_mix.reshape(log_q.shape) - math.log(n)
    return float((log_q - log_qz).mean()), float((log_qz - log_p).mean())


@torch.no_grad()
def elbo_decomposition(
    model,
    guide,
    x: torch.Tensor,
    num_particles: int = 16,
    max_mi_points: int | None = 1000,
    seed: int = 0,
) -> ELBODecomposition:
    r"""Reconstruction, KL, KL per dimension, active units, $I(x;z)$, $\mathrm{KL}(q(z)\|p(z))$.

    * reconstruction $E_q[\log p(x\mid z)]$ and KL by Monte Carlo with `num_particles`
      draws (KL analytic where `torch.distributions.kl_divergence` is registered);
    * KL per dimension $\mathrm{KL}(q(z_u\mid x)\|p(z_u))$ from the marginals;
    * active units $A_u = \mathrm{Cov}_x(E_{q(z|x)}[z_u]) > 0.01$ (Burda et al. 2016);
    * $I(x;z)$ and the aggregate KL on at most `max_mi_points` datapoints (cost
      $O(K N^2)$), see `mutual_information`.
    """
    g, m, pdim = vectorized_traces(model, guide, x, num_particles)
    site = _latent_site(g)
    gs, ms = g.nodes[site], m.nodes[site]
    n, k = x.shape[0], num_particles
    z = gs["value"]
    if z.shape[:2] != (k, n) or z.dim() != 3:
        raise DiagnosticsError(
            f"latent site {site!r}: expected draws of shape (K, N, d), got {tuple(z.shape)}"
        )
    recon = trace_log_prob(m, pdim, k, n, observed=True).mean(0)
    log_q = site_log_prob(gs, data_plate_dim(gs), pdim)
    log_p = site_log_prob(ms, data_plate_dim(ms), pdim)
    kl, kl_method = _kl_total(gs["fn"], ms["fn"], log_q, log_p)
    kl_dim, kl_dim_method = _kl_per_dim(gs["fn"], ms["fn"], z)
    var = _posterior_means(gs["fn"], z).var(0)
    sub = _subset(torch.arange(n), max_mi_points, seed)
    _, q_plain = _plain_guide_site(guide, x[sub.to(x.device)])
    mi, agg = mutual_information(q_plain, z[:, sub], log_q[:, sub], log_p[:, sub])
    out = ELBODecomposition(
        recon, kl, kl_method, kl_dim, kl_dim_method, var, mi, agg, len(sub), z.shape[-1]
    )
    out.verdict = collapse_verdict(out)
    return out


def collapse_verdict(d: ELBODecomposition) -> str:
    """A plain-words reading of the decomposition: collapsed, partly collapsed or not."""
    dim, au, kl = d.latent_dim, d.active_units, float(d.kl.mean())
    log_n = math.log(d.mi_points)
    mi = d.mutual_information
    if au == 0 and kl < 0.05:
        s = (
            f"Posterior collapse: q(z|x) is (almost) the prior for every x (mean KL {kl:.3f} nats, "
            f"0 of {dim} latent dimensions active). The decoder ignores z; the model is a density "
            "model of x alone. Try KL warm-up, a smaller decoder, or a lower β."
        )
    elif au == 0 or mi < MI_COLLAPSE:
        s = (
            "Posterior collapse: q(z|x) hardly changes with x, so z carries almost no information "
            f"about x ({au} of {dim} dimensions pass the active-unit test Cov_x E_q[z_u] > "
            f"{ACTIVE_THRESHOLD}, which ignores how wide q is). The mean KL of {kl:.2f} nats is "
            "spent on q differing from the prior, not on encoding x. Train longer, use KL warm-up "
            "or a smaller decoder."
        )
    elif au < dim:
        s = (
            f"Partial collapse: {dim - au} of {dim} latent dimensions are inactive "
            f"(Cov_x E_q[z_u] ≤ {ACTIVE_THRESHOLD}); they carry no information about x. The "
            f"{au} active dimensions carry a mean KL of {kl:.2f} nats. This is common and often "
            "harmless: the model uses only the capacity it needs."
        )
    else:
        s = f"No posterior collapse: all {dim} latent dimensions are active; mean KL(q(z|x)||p(z)) = {kl:.2f} nats."
    s += f" I(x;z) ≈ {d.mutual_information:.2f} nats (at most log N = {log_n:.2f} with N = {d.mi_points})"
    if d.mutual_information > 0.9 * log_n:
        s += "; the estimate is near its ceiling log N, so the true I(x;z) may be larger"
    s += f". KL(q(z)||p(z)) ≈ {d.aggregate_kl:.2f} nats: "
    if d.aggregate_kl > 1.0:
        s += "the aggregate posterior departs from the prior, so draws from p(z) can land where no data is encoded (worse samples)."
    else:
        s += "the aggregate posterior is close to the prior."
    return s


# --------------------------------------------------------------------------------------- NUTS
@dataclass
class NUTSResult:
    """NUTS draws for a few datapoints: `z` is the latent site's `(chains, draws, points, d)`;
    `sites` holds every continuous latent site (a hierarchical model's `z1`, `z2`, ...)."""

    z: torch.Tensor
    divergences: int
    seconds: float
    chain_method: str
    jit: bool = False
    sites: dict[str, torch.Tensor] = field(default_factory=dict)


def _continuous_latents(trace) -> dict[str, dict]:
    """The latent sites of a trace that NUTS samples: not observed, not discrete (Pyro's NUTS
    sums the discrete ones out by enumeration)."""
    return {
        name: site
        for name, site in trace.nodes.items()
        if is_scored(site) and not site["is_observed"] and not site["fn"].has_enumerate_support
    }


def _prior_trace(model, x: torch.Tensor, kwargs: dict) -> Any:
    """One run of the model with `x` observed, every latent site drawn (discrete ones too)."""
    with poutine.block(), torch.no_grad():
        return poutine.trace(model).get_trace(x, **kwargs)


def _latent_transforms(model, x: torch.Tensor, **kwargs: Any) -> dict[str, Any] | None:
    """Unconstraining transforms Pyro cannot find itself: a mixture prior's support is a
    `MixtureSameFamilyConstraint` (no `biject_to`); use its components' support instead.
    `None` when Pyro finds all; otherwise one for every continuous latent site (NUTS takes the
    dict as complete)."""
    from torch.distributions import biject_to

    out, special = {}, False
    for name, site in _continuous_latents(_prior_trace(model, x, kwargs)).items():
        support = site["fn"].support
        try:
            out[name] = biject_to(support).inv
        except NotImplementedError:
            base = getattr(support, "base_constraint", None)
            if base is None:
                raise
            out[name], special = biject_to(base).inv, True
    return out if special else None


def _prior_init(model, x: torch.Tensor, kwargs: dict):
    """Start NUTS at one prior draw of the continuous sites (over-dispersed, any support), drawn
    with the discrete sites sampled: `init_to_sample` would draw them under NUTS's enumeration,
    which gives a continuous child of an enumerated parent (a gmvae's z ~ p(z | c)) the
    enumeration dim in its shape."""
    from pyro.infer.autoguide.initialization import init_to_value

    values = {n: s["value"] for n, s in _continuous_latents(_prior_trace(model, x, kwargs)).items()}
    return init_to_value(values=values)


def _run_nuts(
    model, x: torch.Tensor, num_samples: int, warmup_steps: int, jit: bool, kwargs: dict
) -> tuple[dict[str, torch.Tensor], int]:
    from pyro.infer import MCMC, NUTS

    kernel = NUTS(
        model,
        transforms=_latent_transforms(model, x, **kwargs),
        init_strategy=_prior_init(model, x, kwargs),
        jit_compile=jit,
        ignore_jit_warnings=True,
    )
    mcmc = MCMC(
        kernel,
        num_samples=num_samples,
        warmup_steps=warmup_steps,
        num_chains=1,
        disable_progbar=not show_bars(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mcmc.run(x, **kwargs)
    div = mcmc.diagnostics().get("divergences", {})
    n_div = sum(len(v) for v in div.values()) if isinstance(div, dict) else 0
    return {k: v.detach() for k, v in mcmc.get_samples().items()}, n_div


def _per_point(draws: torch.Tensor, name: str, chains: int, n: int) -> torch.Tensor:
    """`(S, chains * n, ...)` -> `(chains, S, n, d)`: the vectorized chains taken apart."""
    if draws.dim() < 2 or draws.shape[1] != chains * n:
        raise DiagnosticsError(
            f"NUTS draws of site {name!r} have shape {tuple(draws.shape)}; expected "
            f"(draws, {chains * n}, ...): the site's value must have one row per datapoint"
        )
    return draws.reshape(draws.shape[0], chains, n, -1).transpose(0, 1)


def _repeat_rows(v: Any, times: int, n: int) -> Any:
    """A per-datapoint tensor argument repeated like `x` (one copy per vectorized chain)."""
    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
        return v.repeat(times, *([1] * (v.dim() - 1)))
    return v


def nuts_posterior(
    model,
    x: torch.Tensor,
    num_samples: int = 200,
    warmup_steps: int = 200,
    num_chains: int = 4,
    chain_method: str = "vectorized",
    site: str | None = "z",
    seed: int = 0,
    jit: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> NUTSResult:
    r"""Draws of $p(z\mid x_n)$ by NUTS (`pyro.infer.MCMC`) for the datapoints `x`.

    The model is run with `x` observed, so NUTS targets $p(z\mid x)\propto p(x\mid z)p(z)$
    (Hoffman & Gelman 2014), the datapoints jointly (their posteriors are independent).
    Every continuous latent site is sampled (`NUTSResult.sites`; `site` names the one in
    `NUTSResult.z`, `None`: the first); discrete sites are summed out exactly (Pyro's NUTS
    enumerates them), so a mixture's $p(z \mid x) = \sum_c p(z, c \mid x)$ is the target.
    `model_kwargs` go to the model with `x` (a label `y`, a `given` count).
    `chain_method="vectorized"` stacks `num_chains` copies of `x` into one run: each copy
    is an independent target started at its own prior draw, so the copies are independent
    chains that share step size and mass-matrix adaptation (one process; fast on few cores).
    `"sequential"` runs one MCMC per chain.
    """
    if num_chains < 1 or num_samples < 1:
        raise DiagnosticsError(
            f"need num_chains >= 1 and num_samples >= 1; got {num_chains}, {num_samples}"
        )
    pyro.set_rng_seed(seed)
    start, n = time.perf_counter(), x.shape[0]
    kw = dict(model_kwargs or {})
    if chain_method == "vectorized":
        xs = x.repeat(num_chains, *([1] * (x.dim() - 1)))
        kws = {k: _repeat_rows(v, num_chains, n) for k, v in kw.items()}
        draws, div = _run_nuts(model, xs, num_samples, warmup_steps, jit, kws)
        sites = {k: _per_point(v, k, num_chains, n) for k, v in draws.items()}
    elif chain_method == "sequential":
        runs = [_run_nuts(model, x, num_samples, warmup_steps, jit, kw) for _ in range(num_chains)]
        sites = {
            k: torch.stack([_per_point(r[0][k], k, 1, n)[0] for r in runs]) for k in runs[0][0]
        }
        div = sum(r[1] for r in runs)
    else:
        raise DiagnosticsError(
            f"chain_method: expected 'vectorized' or 'sequential', got {chain_method!r}"
        )
    if not sites:
        raise DiagnosticsError("NUTS found no continuous latent site in the model")
    if site is not None and site not in sites:
        raise DiagnosticsError(f"site {site!r}: not a continuous latent site; got {list(sites)}")
    z = sites[site if site is not None else next(iter(sites))]
    return NUTSResult(z, div, time.perf_counter() - start, chain_method, jit, sites)


@torch.no_grad()
def guide_draws(guide, x: torch.Tensor, num_samples: int) -> torch.Tensor:
    """`num_samples` draws of the guide's latent site per datapoint, `(num_samples, N, d)`."""
    g = _vectorized_guide(guide, x, num_samples, {})
    return g.nodes[_latent_site(g)]["value"].detach()


@torch.no_grad()
def guide_site_draws(
    guide, x: torch.Tensor, num_samples: int, **kwargs: Any
) -> dict[str, torch.Tensor]:
    r"""`num_samples` draws per datapoint of every continuous latent site of the guide,
    `{site: (num_samples, N, d)}`; discrete sites are sampled (not enumerated), so the draws
    are of the guide's marginal, e.g. $q(z \mid x) = \sum_y q(y \mid x)\, q(z \mid x, y)$."""
    g = _vectorized_guide(guide, x, num_samples, kwargs)
    return {
        n: s["value"].detach().reshape(num_samples, x.shape[0], -1)
        for n, s in _continuous_latents(g).items()
    }


def _vectorized_guide(guide, x: torch.Tensor, num_samples: int, kwargs: dict):
    nesting = max((-f.dim for f in _guide_frames(guide, x, kwargs)), default=0)
    with poutine.block(), pyro.plate("_draws", num_samples, dim=-(nesting + 1)):
        return poutine.trace(guide).get_trace(x, **kwargs)


def _guide_frames(guide, x, kwargs: dict | None = None):
    with poutine.block(), torch.no_grad():
        g = poutine.trace(guide).get_trace(x, **(kwargs or {}))
    return [
        f
        for s in g.nodes.values()
        if s["type"] == "sample"
        for f in s["cond_indep_stack"]
        if f.vectorized
    ]


def to_inference_data(
    guide,
    x: torch.Tensor,
    num_samples: int = 500,
    mcmc_draws: torch.Tensor | None = None,
    point_ids: list[int] | None = None,
) -> xr.DataTree:
    r"""Posterior draws of z for the batch `x` as an ArviZ 1.x `xarray.DataTree`.

    ArviZ 1.x replaced `InferenceData` by `xarray.DataTree` (built here with
    `arviz_base.from_dict`); groups are its children: `dt.posterior`, `dt["variational"]`,
    `dt.observed_data`, and every `arviz_stats` function (`summary`, `rhat`, `ess`, ...)
    takes it. Without `mcmc_draws`: group `posterior` holds `num_samples` draws of
    $q(z\mid x)$ (one chain), variable `z` with dims `(chain, draw, point, latent)`. With
    `mcmc_draws` (`(chains, draws, N, d)`, e.g. `NUTSResult.z`): `posterior` holds the MCMC
    draws and the extra group `variational` the q draws. `observed_data` holds `x` (dims
    `(point, feature)`).
    """
    from arviz_base import from_dict

    ids = point_ids if point_ids is not None else list(range(x.shape[0]))
    q = guide_draws(guide, x, num_samples).unsqueeze(0).cpu().double().numpy()
    groups = {"posterior": {"z": q}, "observed_data": {"x": x.detach().cpu().double().numpy()}}
    if mcmc_draws is not None:
        groups = {
            "posterior": {"z": mcmc_draws.cpu().double().numpy()},
            "variational": {"z": q},
            "observed_data": groups["observed_data"],
        }
    d = q.shape[-1]
    return from_dict(
        groups,
        dims={"z": ["point", "latent"], "x": ["point", "feature"]},
        coords={"point": ids, "latent": list(range(d))},
    )


def sites_inference_data(
    mcmc_draws: dict[str, torch.Tensor],
    guide_draws: dict[str, torch.Tensor],
    x: torch.Tensor,
    point_ids: list[int] | None = None,
) -> xr.DataTree:
    """Several latent sites in one ArviZ `xarray.DataTree`: group `posterior` the MCMC draws
    (`{site: (chains, draws, N, d)}`), `variational` the guide's (`{site: (S, N, d)}`, one
    chain), one variable per site with dims `(chain, draw, point, <site>_dim)`."""
    from arviz_base import from_dict

    ids = point_ids if point_ids is not None else list(range(x.shape[0]))
    arr = lambda t: t.detach().cpu().double().numpy()  # noqa: E731
    dims = {k: ["point", f"{k}_dim"] for k in mcmc_draws} | {"x": ["point", "feature"]}
    coords = {"point": ids} | {f"{k}_dim": list(range(v.shape[-1])) for k, v in mcmc_draws.items()}
    return from_dict(
        {
            "posterior": {k: arr(v) for k, v in mcmc_draws.items()},
            "variational": {k: arr(guide_draws[k].unsqueeze(0)) for k in mcmc_draws},
            "observed_data": {"x": arr(x.reshape(x.shape[0], -1))},
        },
        dims=dims,
        coords=coords,
    )


def compare_posteriors(idata: xr.DataTree, var: str = "z") -> dict[str, Any]:
    """R-hat and ESS of the MCMC chains, and NUTS vs q means and sds per point and dimension.

    `idata` is what `to_inference_data(..., mcmc_draws=...)` (or `sites_inference_data`)
    returns, `var` the variable compared. R-hat (rank-normalized,
    split) and bulk ESS come from `arviz_stats.rhat` / `arviz_stats.ess`.
    `std_mean_diff` is (mean_q - mean_NUTS) / sd_NUTS; `sd_ratio` is sd_q / sd_NUTS (< 1:
    q is too narrow, the usual failure of KL(q||p)-fitted posteriors).
    """
    import arviz_stats

    post, q = idata["posterior"][var], idata["variational"][var]
    rhat = np.asarray(arviz_stats.rhat(idata, group="posterior", var_names=[var])[var].values)
    ess = np.asarray(
        arviz_stats.ess(idata, group="posterior", var_names=[var], method="bulk")[var].values
    )
    m_p, s_p = post.mean(("chain", "draw")).values, post.std(("chain", "draw")).values
    m_q, s_q = q.mean(("chain", "draw")).values, q.std(("chain", "draw")).values
    return {
        "points": [int(p) for p in post["point"].values],
        "rhat": rhat.tolist(),
        "ess_bulk": ess.tolist(),
        "max_rhat": float(np.nanmax(rhat)),
        "min_ess": float(np.nanmin(ess)),
        "nuts_mean": m_p.tolist(),
        "nuts_sd": s_p.tolist(),
        "q_mean": m_q.tolist(),
        "q_sd": s_q.tolist(),
        "std_mean_diff": ((m_q - m_p) / s_p).tolist(),
        "sd_ratio": (s_q / s_p).tolist(),
        "mean_abs_std_mean_diff": float(np.mean(np.abs((m_q - m_p) / s_p))),
        "mean_sd_ratio": float(np.mean(s_q / s_p)),
    }


# ---------------------------------------------------------------------------- amortization gap
class _LocalFamily:
    """Per-datapoint free parameters for the family of q(z|x): Gaussian (diagonal or full), or a
    Gaussian base with the guide's (shared, fixed) flow transforms."""

    def __init__(self, q: dist.Distribution) -> None:
        self.transforms = list(q.transforms) if isinstance(q, TransformedDistribution) else []
        base = q.base_dist if self.transforms else q
        if _is_diagonal(base):
            self.kind = "diagonal"
            self.params = [base.base_dist.loc.detach().clone(), base.base_dist.scale.detach().log()]
        elif isinstance(base, MultivariateNormal):
            self.kind, tril = "full", base.scale_tril.detach()
            strict = torch.tril(tril, -1)
            self.params = [
                base.loc.detach().clone(),
                strict.clone(),
                tril.diagonal(dim1=-2, dim2=-1).log(),
            ]
        else:
            raise DiagnosticsError(
                f"amortization gap: q(z|x) must be a Gaussian (diagonal or full) or a flow on one; got {type(q).__name__}"
            )
        for p in self.params:
            p.requires_grad_(True)

    def distribution(self) -> dist.Distribution:
        if self.kind == "diagonal":
            base = dist.Normal(self.params[0], self.params[1].exp()).to_event(1)
        else:
            tril = torch.tril(self.params[1], -1) + torch.diag_embed(self.params[2].exp())
            base = dist.MultivariateNormal(self.params[0], scale_tril=tril)
        return dist.TransformedDistribution(base, self.transforms) if self.transforms else base

    def guide(self, site: str):
        def local_guide(x: torch.Tensor, *args, **kwargs):
            with pyro.plate("data", x.shape[0]):
                return pyro.sample(site, self.distribution())

        return local_guide


@torch.no_grad()
def mixture_log_likelihood(
    model,
    proposals: list[tuple[Any, dist.Distribution]],
    x: torch.Tensor,
    num_samples: int,
    max_rows: int = MAX_ROWS,
) -> torch.Tensor:
    r"""Importance-sampled $\log p(x)$ with the mixture proposal $\bar q = \frac1J\sum_j q_j$.

    `proposals` are `(guide, q_j)` pairs, `q_j` the guide's distribution with batch shape
    `(N,)`; `num_samples / J` draws come from each (deterministic mixture, balance
    heuristic; Veach & Guibas 1995, Owen & Zhou 2000):

    $$
    \log \hat p(x) = \log \frac1K \sum_{j}\sum_{k} \frac{p(x, z_{jk})}{\bar q(z_{jk})},
    \qquad z_{jk} \sim q_j(z\mid x),
    $$

    unbiased for $p(x)$, with weights bounded by $J\,p(x,z)/q_j(z)$ for every j —
    as good as the best-covering proposal. Particles are chunked; `x` is not (local guides).
    """
    n, j = x.shape[0], len(proposals)
    per = max(1, num_samples // j)
    chunk = max(1, max_rows // n)
    acc = torch.full((n,), -math.inf, dtype=torch.float64)
    for guide, _ in proposals:
        for start in range(0, per, chunk):
            k = min(chunk, per - start)
            g, m, pdim = vectorized_traces(model, guide, x, k)
            z = g.nodes[_latent_site(g)]["value"]
            log_mix = torch.stack([q.log_prob(z) for _, q in proposals]).logsumexp(0) - math.log(j)
            lw = trace_log_prob(m, pdim, k, n) - log_mix
            acc = torch.logaddexp(acc, lw.double().logsumexp(0).cpu())
    return (acc - math.log(per * j)).to(x.dtype)


@dataclass
class AmortizationGap:
    """Per-datapoint (`(N,)`) log p̂(x), ELBO(q), ELBO(q*) and the two gaps, nats."""

    log_px: torch.Tensor
    elbo_q: torch.Tensor
    elbo_qstar: torch.Tensor
    steps: int
    family: str
    qstar_loc: torch.Tensor
    qstar_scale: torch.Tensor

    @property
    def approximation_gap(self) -> torch.Tensor:
        return self.log_px - self.elbo_qstar

    @property
    def amortization_gap(self) -> torch.Tensor:
        return self.elbo_qstar - self.elbo_q

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "points": int(self.log_px.numel()),
            "steps": self.steps,
            "family": self.family,
        }
        for name in ("log_px", "elbo_q", "elbo_qstar", "approximation_gap", "amortization_gap"):
            mean, se = mean_and_se(getattr(self, name))
            out[name], out[name + "_se"] = mean, se
        out["inference_gap"] = out["log_px"] - out["elbo_q"]
        out["units"] = "nats per datapoint"
        return out


def _optimize_local(
    model, fam: _LocalFamily, site: str, x: torch.Tensor, steps: int, lr: float, num_particles: int
) -> None:
    opt = torch.optim.Adam(fam.params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=lr / 20)
    local = fam.guide(site)
    for _ in bar(range(steps), desc="amortization gap: fitting q* per point", unit="step"):
        loss = -log_weights_with_grad(model, local, x, num_particles).mean(0).sum()
        grads = torch.autograd.grad(
            loss, fam.params
        )  # only q*'s parameters: the model is untouched
        for p, gr in zip(fam.params, grads, strict=True):
            p.grad = gr
        opt.step()
        sched.step()


def amortization_gap(
    model,
    guide,
    x: torch.Tensor,
    steps: int = 300,
    lr: float = 0.02,
    num_particles: int = 32,
    eval_particles: int = 1000,
    iwae_samples: int = 1000,
) -> AmortizationGap:
    r"""Approximation and amortization gaps per datapoint (Cremer, Li & Duvenaud 2018).

    $q^*(z\mid x_n)$ is the member of q's family (Gaussian parameters freed per datapoint,
    any flow transforms kept) that maximizes the ELBO, found by Adam on the Monte Carlo ELBO
    (`num_particles` draws) for `steps` steps, starting from the encoder's output. Then

    $$
    \underbrace{\log p(x) - \mathrm{ELBO}(q)}_{\text{inference gap}} = \underbrace{\log p(x) - \mathrm{ELBO}(q^*)}_{\text{approximation gap}}
    + \underbrace{\mathrm{ELBO}(q^*) - \mathrm{ELBO}(q)}_{\text{amortization gap}} .
    $$

    ELBOs use `eval_particles` draws; $\log \hat p(x)$ is
    `mixture_log_likelihood` with the defensive proposal $\frac12 q + \frac12 q^*$
    (`iwae_samples` draws in all): q* alone is often too narrow a proposal (k-hat > 0.7) and
    would overestimate $\log p(x)$ by chance.
    """
    site, q0 = _plain_guide_site(guide, x)
    fam = _LocalFamily(q0)
    _optimize_local(model, fam, site, x, steps, lr, num_particles)
    for p in fam.params:
        p.requires_grad_(False)
    local = fam.guide(site)
    log_px = mixture_log_likelihood(
        model, [(guide, q0), (local, fam.distribution())], x, iwae_samples
    )
    base = fam.distribution()
    base = base.base_dist if fam.transforms else base
    scale = (
        base.base_dist.scale
        if fam.kind == "diagonal"
        else base.scale_tril.diagonal(dim1=-2, dim2=-1)
    )
    return AmortizationGap(
        log_px=log_px,
        elbo_q=elbo(model, guide, x, eval_particles),
        elbo_qstar=elbo(model, local, x, eval_particles),
        steps=steps,
        family=fam.kind + (" + flow" if fam.transforms else ""),
        qstar_loc=fam.params[0].detach(),
        qstar_scale=scale.detach(),
    )


# ----------------------------------------------------------------------------------- a run
@dataclass
class Diagnosis:
    """What `diagnose_run` found: `results` is JSON-ready; the rest feeds the figures."""

    results: dict[str, Any]
    decomposition: ELBODecomposition | None = None
    khat: torch.Tensor | None = None
    idata: Any = None
    gap: AmortizationGap | None = None
    code_variance: torch.Tensor | None = None


@torch.no_grad()
def code_usage(ae, x: torch.Tensor) -> torch.Tensor:
    """Variance over datapoints of each code dimension of a deterministic encoder, `(d,)`."""
    return torch.cat([ae.encode(xb) for xb in x.split(1024)]).var(0)


_AE_NOT_APPLICABLE = (
    "An autoencoder has no prior p(z), no posterior q(z|x) and no likelihood model of x: the "
    "ELBO, log-likelihood, KL terms, I(x;z), PSIS k-hat, a NUTS posterior and amortization gaps "
    "are not defined for it. Reported: reconstruction error and code usage (variance of each "
    "code dimension over the test set)."
)


def _diagnose_ae(run: Run, x: torch.Tensor) -> Diagnosis:
    var = code_usage(run.model, x)
    results = {
        "kind": "ae",
        "run": str(run.dir),
        "split": "test",
        "points": int(x.shape[0]),
        "reconstruction_error": float(reconstruction_error(run.model, x).mean()),
        "reconstruction_error_note": "sum of squared errors per datapoint, x̂ = decoder(encoder(x))",
        "code_variance": var.tolist(),
        "codes_used": int((var > ACTIVE_THRESHOLD).sum()),
        "latent_dim": int(var.numel()),
        "not_applicable": _AE_NOT_APPLICABLE,
    }
    return Diagnosis(results=results, code_variance=var)


def _pick_points(n: int, k: int, seed: int) -> list[int]:
    return sorted(
        torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[: min(k, n)].tolist()
    )


@dataclass
class DiagnoseOptions:
    """Settings of `diagnose_run` (defaults: about 30 s for a digits run on 2 CPU cores).

    Attributes:
        points: datapoints for NUTS (0 skips NUTS).
        iwae_samples: K of the IWAE log-likelihood.
        iwae_points: test points for the IWAE log-likelihood and the ELBO (a seeded subset;
            `None`: the whole test split).
        khat_samples: importance samples per datapoint for PSIS k-hat.
        max_points: cap on datapoints for the decomposition, k-hat and I(x;z) (a seeded subset).
        gap_points: datapoints for the amortization gap (0 skips it).
        gap_steps: Adam steps for q*.
        gap_particles: particles for q*.
        nuts_samples: NUTS draws per chain.
        nuts_warmup: NUTS warm-up steps per chain.
        chains: NUTS chains.
    """

    points: int = 4
    iwae_samples: int = 1000
    iwae_points: int | None = 2000
    khat_samples: int = 1000
    max_points: int = 1000
    gap_points: int = 50
    gap_steps: int = 200
    gap_particles: int = 16
    nuts_samples: int = 200
    nuts_warmup: int = 200
    chains: int = 4
    seed: int = 0


def diagnose_run(run: Run, options: DiagnoseOptions | None = None, **overrides: Any) -> Diagnosis:
    """All diagnostics of a trained run on its test split (nats per datapoint throughout).

    `options` (or keyword overrides of `DiagnoseOptions`) set the sizes. The IWAE
    log-likelihood and the ELBO use the whole test split; decomposition, k-hat and I(x;z) at
    most `max_points` datapoints; NUTS `points`; the amortization gap `gap_points`.

    In a `torch.distributed` job (e.g. `torchrun --nproc-per-node 4 -m pyrovae diagnose RUN`)
    the per-datapoint estimates — k-hat, the IWAE log-likelihood, the ELBO — are sharded over
    the ranks and gathered; the decomposition, NUTS, the amortization gap (and the report) run
    on rank 0, and the other ranks return the gathered estimates only.
    """
    from dataclasses import replace

    o = replace(options or DiagnoseOptions(), **overrides)
    if run.data is None:
        raise DiagnosticsError("diagnose_run needs the run's data: load_run(dir, data=True)")
    from pyrovae import distributed

    device = next(run.model.parameters()).device
    x_all = run.data.x_test.to(device)
    r = distributed.rank()  # under torchrun: each rank its own, reproducible noise
    pyro.set_rng_seed(o.seed if r == 0 else distributed.step_seed(o.seed, -1, 1, r) % 2**32)
    if not hasattr(run.model, "guide"):  # the autoencoder baseline
        return _diagnose_ae(run, x_all)
    from pyrovae.structured import STRUCTURED

    if isinstance(run.model, tuple(STRUCTURED.values())):
        from pyrovae.structured.diagnose import diagnose_structured

        with evaluation_mode(run.model), frozen_parameters(run.model):
            return diagnose_structured(run, x_all, o)
    with evaluation_mode(run.model), frozen_parameters(run.model):
        return _diagnose_vae(run, run.model, x_all, o)


def estimate_seconds(run: Run, options: DiagnoseOptions | None = None) -> dict[str, float]:
    """Rough seconds per stage of `diagnose_run` on this machine, from the sizes and one
    timed probe of the model and guide (64 test points x 256 samples, the best of two)."""
    o = options or DiagnoseOptions()
    m, x = run.model, run.data.x_test.to(next(run.model.parameters()).device)
    n = x.shape[0]
    probe = x[: min(64, n)]
    def best(fn, repeats: int = 3) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return max(min(times), 1e-6)

    small = x[: max(1, min(n, o.points * o.chains))]
    with evaluation_mode(m), torch.no_grad():
        log_weights(m.model, m.guide, probe, 4)  # warm-up
        rate = probe.shape[0] * 256 / best(lambda: log_weights(m.model, m.guide, probe, 256), 2)
        call = best(lambda: log_weights(m.model, m.guide, small, 1))  # NUTS's unit of work
    ni = n if o.iwae_points is None else min(n, o.iwae_points)
    nm = min(n, o.max_points)
    est = {
        "decomposition": nm * 40 / rate,
        "psis": nm * o.khat_samples / rate,
        "log_likelihood": ni * (o.iwae_samples + 1) / rate,
    }
    if o.points > 0:  # calibrated: a JIT-compiled NUTS step costs ~2.5 unjitted model+guide calls
        est["nuts"] = (o.nuts_samples + o.nuts_warmup) * 2.5 * call
    if o.gap_points > 0:
        rows = o.gap_points * (3 * o.gap_steps * o.gap_particles + 2000 + o.iwae_samples)
        est["amortization_gap"] = rows / rate
    return est


def plan(run: Run, options: DiagnoseOptions | None = None) -> str:
    """What `diagnose_run` will run, with a rough duration each, and the options to change it."""
    o = options or DiagnoseOptions()
    n = run.data.x_test.shape[0]
    est = estimate_seconds(run, o)
    ni = n if o.iwae_points is None else min(n, o.iwae_points)
    what = {
        "decomposition": f"ELBO decomposition and I(x;z) on {min(n, o.max_points)} test points",
        "psis": f"PSIS k-hat with {o.khat_samples} samples on {min(n, o.max_points)} points",
        "log_likelihood": f"IWAE log p(x) with K={o.iwae_samples} on {ni} of {n} test points",
        "nuts": f"NUTS, {o.chains} chains x {o.nuts_warmup}+{o.nuts_samples} steps, {o.points} points",
        "amortization_gap": f"amortization gap on {o.gap_points} points ({o.gap_steps} steps)",
    }
    lines = [f"  {what[k]}: ~{_duration(v)}" for k, v in est.items()]
    return (
        f"diagnose will run (about {_duration(sum(est.values()))} in all, rough):\n"
        + "\n".join(lines)
        + "\n  faster: --iwae-samples 200 --points 0 --gap-points 0; further: --iwae-samples 5000 "
        "--iwae-points 0 (every test point) --points 16 --max-points 5000"
    )


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


@contextmanager
def frozen_parameters(module: torch.nn.Module) -> Iterator[None]:
    """Turn off `requires_grad` of a module's parameters (for NUTS with `jit_compile` and
    to skip parameter gradients); restores the flags on exit."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class _Clock:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self.t = now - self.t, now
        log.info("%s: done in %.1f s", name.replace("_", " "), self.laps[name])


def _estimates(vae, x_all: torch.Tensor, o: DiagnoseOptions) -> dict[str, Any]:
    """IWAE log-likelihood and ELBO (sharded over the ranks under `torch.distributed`)."""
    from pyrovae.distributed import per_point

    xi = _subset(x_all, o.iwae_points, o.seed + 3)
    ll_mean, ll_se = mean_and_se(
        per_point(lambda xs: log_likelihood(vae.model, vae.guide, xs, o.iwae_samples), xi)
    )
    el_mean, el_se = mean_and_se(
        per_point(lambda xs: elbo(vae.model, vae.guide, xs, 1, batch_size=1024), xi)
    )
    return {
        "elbo": {"mean": el_mean, "se": el_se, "particles": 1, "points": int(xi.shape[0])},
        "log_likelihood": {
            "mean": ll_mean,
            "se": ll_se,
            "samples": o.iwae_samples,
            "points": int(xi.shape[0]),
            "estimator": "importance sampling (IWAE bound), proposal q(z|x)",
        },
        "bound_gap": ll_mean - el_mean,
        "reconstruction_error": (
            float(reconstruction_error(vae, xi).mean()) if hasattr(vae, "reconstruct") else None
        ),
    }


def _nuts_section(vae, x_all: torch.Tensor, o: DiagnoseOptions) -> tuple[dict[str, Any], Any]:
    ids = _pick_points(x_all.shape[0], o.points, o.seed)
    xs = x_all[ids]
    site, _ = _plain_guide_site(vae.guide, xs)
    args = (vae.model, xs, o.nuts_samples, o.nuts_warmup, o.chains)
    try:
        nuts = nuts_posterior(*args, site=site, seed=o.seed, jit=True)
    except Exception:  # noqa: BLE001 - some models do not trace (e.g. flows, pyro #3132): no JIT then
        nuts = nuts_posterior(*args, site=site, seed=o.seed)
    idata = to_inference_data(
        vae.guide, xs, o.nuts_samples * o.chains, mcmc_draws=nuts.z, point_ids=ids
    )
    info = {
        "chains": o.chains,
        "draws": o.nuts_samples,
        "warmup": o.nuts_warmup,
        "chain_method": nuts.chain_method,
        "divergences": nuts.divergences,
        "jit": nuts.jit,
        "seconds": nuts.seconds,
        **compare_posteriors(idata),
    }
    return info, idata


def _diagnose_vae(run: Run, vae, x_all: torch.Tensor, o: DiagnoseOptions) -> Diagnosis:
    from pyrovae.distributed import rank

    clock = _Clock()
    x = _subset(x_all, o.max_points, o.seed)
    # the per-datapoint estimates first: sharded over the ranks under torch.distributed
    khat = psis_khat(vae.model, vae.guide, x, o.khat_samples)
    clock.lap("psis")
    estimates = _estimates(vae, x_all, o)
    clock.lap("log_likelihood")
    sharded = {"psis": {"samples": o.khat_samples, **khat_summary(khat)}, **estimates}
    if rank() != 0:  # the rest runs on rank 0
        return Diagnosis(results=sharded, khat=khat)
    dec = elbo_decomposition(vae.model, vae.guide, x, max_mi_points=o.max_points, seed=o.seed)
    clock.lap("decomposition")
    res: dict[str, Any] = {
        "kind": "vae",
        "run": str(run.dir),
        "split": "test",
        "binarize": run.config.data.binarize,
        "points": int(x_all.shape[0]),
        "units": "nats per datapoint (ELBO and log-likelihood: higher is better)",
    }
    if run.config.model.kind == "vae":
        res["model"] = {k: getattr(vae.config, k).kind for k in ("prior", "likelihood", "guide")}
    else:
        res["model"] = {"kind": run.config.model.kind}
    res["model"]["latent_dim"] = dec.latent_dim
    res.update(estimates)
    res["decomposition"] = dec.to_dict()
    res["psis"] = sharded["psis"]
    idata = gap = None
    if o.points > 0:
        res["nuts"], idata = _nuts_section(vae, x_all, o)
        clock.lap("nuts")
    if o.gap_points > 0:
        xg = x_all[_pick_points(x_all.shape[0], o.gap_points, o.seed + 7)]
        with torch.enable_grad():
            gap = amortization_gap(
                vae.model,
                vae.guide,
                xg,
                steps=o.gap_steps,
                num_particles=o.gap_particles,
                iwae_samples=o.iwae_samples,
            )
        res["amortization"] = gap.to_dict()
        clock.lap("amortization_gap")
    res["seconds"] = clock.laps
    res["verdicts"] = verdicts(res)
    return Diagnosis(results=res, decomposition=dec, khat=khat, idata=idata, gap=gap)


def verdicts(res: dict[str, Any]) -> dict[str, str]:
    """Plain-words readings of the numbers in `diagnose_run`'s results."""
    out = {"collapse": res["decomposition"]["verdict"]}
    ps = res["psis"]
    bad, good = ps["share_above_0.7"], ps["share_below_0.5"]
    if bad > 0.1:
        out["psis"] = (
            f"{bad:.0%} of datapoints have k-hat > 0.7: q(z|x) is a poor importance-sampling proposal "
            "there (too narrow or misplaced); log-likelihood estimates for them are unreliable."
        )
    else:
        out["psis"] = (
            f"{good:.0%} of datapoints have k-hat < 0.5 and {bad:.0%} above 0.7: q(z|x) is a usable proposal; the IWAE estimate is trustworthy."
        )
    out["bound"] = (
        f"The IWAE estimate (K={res['log_likelihood']['samples']}) is {res['bound_gap']:.2f} nats above the "
        "ELBO: that is (a lower estimate of) the mean KL(q(z|x) || p(z|x))."
    )
    if "nuts" in res:
        nu = res["nuts"]
        conv = (
            "converged"
            if nu["max_rhat"] < 1.01
            else ("nearly converged" if nu["max_rhat"] < 1.05 else "NOT converged")
        )
        width = (
            "too narrow"
            if nu["mean_sd_ratio"] < 0.8
            else ("too wide" if nu["mean_sd_ratio"] > 1.25 else "about right")
        )
        out["nuts"] = (
            f"NUTS chains {conv} (max R-hat {nu['max_rhat']:.3f}, min ESS {nu['min_ess']:.0f}). "
            f"Against them q(z|x) is {width} (sd ratio q/NUTS {nu['mean_sd_ratio']:.2f}) and its means are "
            f"off by {nu['mean_abs_std_mean_diff']:.2f} posterior sds on average."
        )
    if "amortization" in res:
        a = res["amortization"]
        main = (
            "amortization (the encoder)"
            if a["amortization_gap"] > a["approximation_gap"]
            else "approximation (q's family)"
        )
        out["amortization"] = (
            f"Inference gap {a['inference_gap']:.2f} nats = approximation gap {a['approximation_gap']:.2f} "
            f"+ amortization gap {a['amortization_gap']:.2f}; most of it comes from {main}."
        )
    return out
