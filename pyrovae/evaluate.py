r"""Per-datapoint estimators for any Pyro `(model, guide)` pair.

The pair must put its per-datapoint sites inside `pyro.plate("data", ...)` and be called on the
whole batch `x` (no subsampling). Values are in **nats per datapoint**.

* `log_weights` — $\log w_k(x) = \log p(x, z_k) - \log q(z_k \mid x)$, $z_k \sim q(z \mid x)$;
* `elbo` — $\frac1K \sum_k \log w_k$, unbiased for
  $\mathrm{ELBO}(x) = E_q[\log p(x, z) - \log q(z \mid x)] \le \log p(x)$;
* `log_likelihood` — the importance-sampled (IWAE) bound
  $\log \frac1K \sum_{k=1}^K w_k \le \log p(x)$ in expectation, which increases with $K$ and
  converges to $\log p(x)$ (Burda et al., "Importance Weighted Autoencoders", ICLR 2016);

Particles are vectorized with an extra `pyro.plate` left of the model's plates, so one model
call scores a whole chunk of $K \times B$ latent draws.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager

import pyro
import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled

DATA_PLATE = "data"
PARTICLE_PLATE = "_num_particles"
#: default bound on particles x datapoints scored in one model call by `log_likelihood`
MAX_ROWS = 1 << 14
#: fewest datapoints per chunk in `log_likelihood` when `batch_size` is not given
MIN_POINTS = 32


def site_log_prob(site: dict, data_dim: int, particle_dim: int | None) -> torch.Tensor:
    """A site's log density summed over every dim except the data (and particle) plate dims."""
    lp = site["fn"].log_prob(site["value"])
    keep = {data_dim % lp.dim()} if lp.dim() else set()
    if particle_dim is not None:
        keep.add(particle_dim % lp.dim())
    other = [d for d in range(lp.dim()) if d not in keep]
    return lp.sum(other) if other else lp


def data_plate_dim(site: dict) -> int:
    """The (negative) dim of the site's `pyro.plate("data")`; `ValueError` if it has none."""
    for frame in site["cond_indep_stack"]:
        if frame.name == DATA_PLATE:
            return frame.dim
    raise ValueError(
        f"sample site {site['name']!r} is not inside pyro.plate({DATA_PLATE!r}): per-datapoint "
        "estimators need every sample site of the model and guide inside that plate"
    )


def _max_plate_nesting(model, guide, *args, **kwargs) -> int:
    with poutine.block():
        g = poutine.trace(guide).get_trace(*args, **kwargs)
        m = poutine.trace(poutine.replay(model, trace=g)).get_trace(*args, **kwargs)
    dims = [
        -f.dim
        for t in (g, m)
        for s in t.nodes.values()
        if s["type"] == "sample"
        for f in s["cond_indep_stack"]
        if f.vectorized
    ]
    return max(dims, default=0)


def is_scored(site: dict) -> bool:
    """A sample site that contributes to $\\log p$ or $\\log q$ (not a plate/subsample)."""
    return (
        site["type"] == "sample"
        and site["name"] != PARTICLE_PLATE
        and site["fn"].__class__.__name__ != "_Subsample"
    )


def vectorized_traces(
    model,
    guide,
    x: torch.Tensor,
    num_particles: int,
    *args,
    max_plate_nesting: int | None = None,
    hide: bool = True,
    **kwargs,
):
    """Guide and (replayed) model traces with `num_particles` draws per datapoint.

    Returns `(guide_trace, model_trace, particle_dim)`; every sample site's batch shape is
    `(num_particles, N)` at dims `(particle_dim, data dim)`. Gradients flow (no `no_grad`).
    `max_plate_nesting`: the program's plate depth when known (else one extra run of guide
    and model finds it). `hide`: run under `poutine.block()` so that enclosing handlers see
    nothing; `False` lets them see the sites (e.g. `pyro.infer.SVI`'s capture of the
    parameters that the loss uses).
    """
    nesting = max_plate_nesting
    if nesting is None:
        nesting = _max_plate_nesting(model, guide, x, *args, **kwargs)
    pdim = -(nesting + 1)
    particles = pyro.plate(PARTICLE_PLATE, num_particles, dim=pdim)

    def vec(fn):
        def wrapped(*a, **k):
            with particles:
                return fn(*a, **k)

        return wrapped

    with poutine.block() if hide else contextlib.nullcontext():
        g = poutine.trace(vec(guide)).get_trace(x, *args, **kwargs)
        m = poutine.trace(poutine.replay(vec(model), trace=g)).get_trace(x, *args, **kwargs)
    return g, m, pdim


def trace_log_prob(trace, pdim: int, num_particles: int, n: int, observed: bool | None = None):
    """Sum of per-datapoint log densities of a trace's sample sites, shape `(K, N)`.

    `observed=True` keeps only observed sites, `False` only latent ones, `None` all.
    """
    total = torch.zeros(())
    for site in trace.nodes.values():
        if not is_scored(site) or (observed is not None and site["is_observed"] != observed):
            continue
        total = total + site_log_prob(site, data_plate_dim(site), pdim)
    total = total.expand(num_particles, n) if total.dim() < 2 else total
    return total.reshape(num_particles, n)


def log_weights_with_grad(
    model, guide, x: torch.Tensor, num_particles: int = 1, *args, **kwargs
) -> torch.Tensor:
    r"""`log_weights` without `torch.no_grad` (for optimizing a guide on it)."""
    g, m, pdim = vectorized_traces(model, guide, x, num_particles, *args, **kwargs)
    n = x.shape[0]
    return trace_log_prob(m, pdim, num_particles, n) - trace_log_prob(g, pdim, num_particles, n)


@torch.no_grad()
def log_weights(
    model, guide, x: torch.Tensor, num_particles: int = 1, *args, **kwargs
) -> torch.Tensor:
    r"""Log importance weights $\log p(x, z_k) - \log q(z_k|x)$, shape `(num_particles, N)`.

    Particles are vectorized with an extra plate left of the model's plates. Site scales (β,
    subsampling) are ignored: this is always the plain joint density.
    """
    return log_weights_with_grad(model, guide, x, num_particles, *args, **kwargs)


def elbo(
    model,
    guide,
    x: torch.Tensor,
    num_particles: int = 1,
    batch_size: int | None = None,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Monte Carlo ELBO per datapoint, shape `(N,)`, nats.

    $$
    \widehat{\mathrm{ELBO}}(x) = \frac1K\sum_{k=1}^K \log p(x,z_k) - \log q(z_k|x),
    \qquad z_k \sim q(z\mid x).
    $$

    `batch_size` splits the datapoints into chunks (memory). `y`: labels passed to the
    programs as `y=` (split with `x`), for structured models conditioned on them.
    """
    bs = batch_size or x.shape[0]
    ys = [None] * len(x.split(bs)) if y is None else y.split(bs)
    out = [
        log_weights(model, guide, xb, num_particles, **_labels(yb)).mean(0)
        for xb, yb in zip(x.split(bs), ys, strict=True)
    ]
    return torch.cat(out)


def _labels(y: torch.Tensor | None) -> dict:
    return {} if y is None else {"y": y}


def enumerated_sites(model, guide, x: torch.Tensor, **kwargs) -> dict[str, dict]:
    """The latent sites of the program marked `infer={"enumerate": ...}` (discrete variables
    that `TraceEnum_ELBO` sums out), name -> site, from one traced run on `x`: the guide's,
    then the model's that the guide does not have."""
    with torch.no_grad(), poutine.block():
        g = poutine.trace(guide).get_trace(x, **kwargs)
        m = poutine.trace(poutine.replay(model, trace=g)).get_trace(x, **kwargs)
    out: dict[str, dict] = {}
    for trace in (g, m):
        for name, site in trace.nodes.items():
            if (
                is_scored(site)
                and not site["is_observed"]
                and site["infer"].get("enumerate")
                and name not in out
            ):
                out[name] = site
    return out


def log_weights_summed(
    model, guide, x: torch.Tensor, num_particles: int, sites: dict[str, dict], **kwargs
) -> torch.Tensor:
    r"""Log importance weights with the discrete sites `sites` summed out exactly, shape `(K, N)`:

    $$
    \log w_k = \log \sum_{c} \frac{p(x, c, z_{kc})}{q(z_{kc} \mid x, c)},
    \qquad z_{kc} \sim q(z \mid x, c),
    $$

    the sum over every joint value $c$ of the discrete sites (their `enumerate_support`),
    each conditioned in guide and model (`poutine.condition`); the guide's own
    $q(c \mid x)$ drops out. $E[w_k] = p(x)$, so $\log \frac1K \sum_k w_k$ is the IWAE
    bound with the discrete variables marginalized inside each weight (lower variance than
    sampling them). Without `sites` it is `log_weights`.
    """
    if not sites:
        return log_weights_with_grad(model, guide, x, num_particles, **kwargs)
    n = x.shape[0]
    supports = []
    for site in sites.values():
        fn = site["fn"]
        values = fn.enumerate_support(expand=False)
        event = values.shape[values.dim() - len(fn.event_shape) :] if fn.event_shape else ()
        supports.append([v.reshape(event).expand(n, *event) for v in values])
    terms = []
    for combo in itertools.product(*supports):
        data = dict(zip(sites, combo, strict=True))
        g, m, pdim = vectorized_traces(
            poutine.condition(model, data=data),
            poutine.condition(guide, data=data),
            x,
            num_particles,
            **kwargs,
        )
        lw = trace_log_prob(m, pdim, num_particles, n)
        terms.append(lw - trace_log_prob(g, pdim, num_particles, n, observed=False))
    return torch.logsumexp(torch.stack(terms), 0)


def _chunks(num_samples: int, n: int, batch_size: int | None, max_rows: int) -> tuple[int, int]:
    """(datapoints per chunk, particles per chunk), their product at most about `max_rows`.

    Without `batch_size`: at least `MIN_POINTS` datapoints per chunk (fewer, larger
    datapoint chunks; with large K the particles are split instead).
    """
    if batch_size is None:
        batch_size = max(max_rows // num_samples, MIN_POINTS)
    b = max(1, min(batch_size, n))
    return b, max(1, min(num_samples, max_rows // b))


@torch.no_grad()
def log_likelihood(
    model,
    guide,
    x: torch.Tensor,
    num_samples: int = 5000,
    batch_size: int | None = None,
    max_rows: int = MAX_ROWS,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Importance-sampled $\log p(x)$ per datapoint (the IWAE bound), shape `(N,)`, nats.

    $$
    \log \hat p_K(x) = \log \frac1K \sum_{k=1}^K \frac{p(x, z_k)}{q(z_k\mid x)},
    \qquad z_k \sim q(z \mid x),
    $$

    with $E[\log \hat p_K(x)] \le \log p(x)$, increasing in $K$ (Burda et al. 2016).
    The guide is the proposal. Memory is bounded whatever `num_samples`: datapoints are split
    into chunks of `batch_size` and particles into chunks so that at most about `max_rows`
    (particle, datapoint) pairs go through the networks at once; the log-sum-exp over
    particles is accumulated chunk by chunk (streaming: $s \leftarrow
    \operatorname{logaddexp}(s, \operatorname{logsumexp}_k \log w_k)$). Pyro's validation
    (if enabled) runs on the first particle chunk of every datapoint chunk, so every datapoint
    is checked once; the remaining chunks only redraw z and skip it.

    Discrete latent sites marked `infer={"enumerate": ...}` (structured models) are summed
    out exactly inside each weight (`log_weights_summed`). `y`: labels passed to the
    programs as `y=` (split with `x`), for structured models conditioned on them.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples}")
    from pyrovae.progress import bar

    b, k = _chunks(num_samples, x.shape[0], batch_size, max_rows)
    out = []
    progress = bar(total=x.shape[0], desc=f"log p(x), K={num_samples}", unit="pt")
    ys = [None] * len(x.split(b)) if y is None else y.split(b)
    sites = enumerated_sites(model, guide, x[:1], **_labels(None if y is None else y[:1]))
    if sites:  # each weight sums over every joint value of the discrete sites
        n_values = math.prod(int(s["fn"].enumerate_support(expand=False).shape[0]) for s in sites.values())
        k = max(1, k // n_values)
    for xb, yb in zip(x.split(b), ys, strict=True):
        acc = torch.full((xb.shape[0],), -math.inf, dtype=torch.float64)
        done = 0
        while done < num_samples:
            kc = min(k, num_samples - done)
            # the first particle chunk of each datapoint chunk runs with Pyro's validation as
            # configured (it checks every datapoint); later ones only redraw z and skip it
            with pyro.validation_enabled(is_validation_enabled() and done == 0):
                lw = log_weights_summed(model, guide, xb, kc, sites, **_labels(yb))
                lw = lw.detach().to(torch.float64)
            acc = torch.logaddexp(acc, torch.logsumexp(lw, 0).cpu())
            done += kc
        out.append(acc - math.log(num_samples))
        progress.update(xb.shape[0])
    progress.close()
    return torch.cat(out).to(x.dtype if x.is_floating_point() else torch.get_default_dtype())


@torch.no_grad()
def reconstruction_error(net, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    r"""Squared error $\|x - \hat x\|^2$ per datapoint, $\hat x = E[x \mid z=E_q z]$ (VAE) or the AE output."""
    return torch.cat([(xb - net.reconstruct(xb)).pow(2).sum(-1) for xb in x.split(batch_size)])


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean and its standard error $s/\\sqrt N$ over datapoints."""
    v = values.detach().double().flatten()
    se = float(v.std(unbiased=True) / math.sqrt(v.numel())) if v.numel() > 1 else float("nan")
    return float(v.mean()), se


@contextmanager
def evaluation_mode(net: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`net.eval()` inside the block, its previous train/eval mode restored on exit."""
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)
