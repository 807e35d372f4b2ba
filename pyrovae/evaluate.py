r"""Per-datapoint estimators for any Pyro ``(model, guide)`` pair.

The pair must put its per-datapoint sites inside ``pyro.plate("data", ...)`` and be called on the
whole batch ``x`` (no subsampling). Values are in **nats per datapoint**.

* :func:`log_weights` — :math:`\log w_k(x) = \log p(x, z_k) - \log q(z_k \mid x)`, :math:`z_k \sim q`;
* :func:`elbo` — :math:`\frac1K \sum_k \log w_k` (unbiased for the ELBO);
"""

from __future__ import annotations

import pyro
import torch
from pyro import poutine

DATA_PLATE = "data"


def _site_log_prob(site: dict, data_dim: int, particle_dim: int | None) -> torch.Tensor:
    lp = site["fn"].log_prob(site["value"])
    keep = {data_dim % lp.dim()} if lp.dim() else set()
    if particle_dim is not None:
        keep.add(particle_dim % lp.dim())
    other = [d for d in range(lp.dim()) if d not in keep]
    return lp.sum(other) if other else lp


def _data_dim(site: dict) -> int:
    for frame in site["cond_indep_stack"]:
        if frame.name == DATA_PLATE:
            return frame.dim
    raise ValueError(
        f"sample site {site['name']!r} is not inside pyro.plate({DATA_PLATE!r}): per-datapoint "
        "estimators need every sample site of the model and guide inside that plate"
    )


def _max_plate_nesting(model, guide, *args) -> int:
    with poutine.block():
        g = poutine.trace(guide).get_trace(*args)
        m = poutine.trace(poutine.replay(model, trace=g)).get_trace(*args)
    dims = [-f.dim for t in (g, m) for s in t.nodes.values() if s["type"] == "sample" for f in s["cond_indep_stack"] if f.vectorized]
    return max(dims, default=0)


@torch.no_grad()
def log_weights(model, guide, x: torch.Tensor, num_particles: int = 1, *args, **kwargs) -> torch.Tensor:
    r"""Log importance weights :math:`\log p(x, z_k) - \log q(z_k|x)`, shape ``(num_particles, N)``.

    Particles are vectorized with an extra plate left of the model's plates. Site scales (β,
    subsampling) are ignored: this is always the plain joint density.
    """
    nesting = _max_plate_nesting(model, guide, x, *args, **kwargs)
    particles = pyro.plate("_num_particles", num_particles, dim=-(nesting + 1))

    def vec(fn):
        def wrapped(*a, **k):
            with particles:
                return fn(*a, **k)

        return wrapped

    with poutine.block():
        g = poutine.trace(vec(guide)).get_trace(x, *args, **kwargs)
        m = poutine.trace(poutine.replay(vec(model), trace=g)).get_trace(x, *args, **kwargs)
    pdim = -(nesting + 1)
    total = torch.zeros((), device=x.device, dtype=x.dtype if x.is_floating_point() else torch.get_default_dtype())
    for trace, sign in ((m, 1.0), (g, -1.0)):
        for site in trace.nodes.values():
            if site["type"] != "sample" or site["name"] == "_num_particles" or site["fn"].__class__.__name__ == "_Subsample":
                continue
            lp = _site_log_prob(site, _data_dim(site), pdim)
            total = total + sign * lp
    n = x.shape[0]
    total = total.expand(num_particles, n) if total.dim() < 2 else total
    return total.reshape(num_particles, n)


def elbo(model, guide, x: torch.Tensor, num_particles: int = 1, batch_size: int | None = None) -> torch.Tensor:
    r"""Monte Carlo ELBO per datapoint, :math:`\frac1K\sum_k \log p(x,z_k) - \log q(z_k|x)`; shape ``(N,)``."""
    bs = batch_size or x.shape[0]
    out = [log_weights(model, guide, xb, num_particles).mean(0) for xb in x.split(bs)]
    return torch.cat(out)


@torch.no_grad()
def reconstruction_error(net, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    r"""Squared error :math:`\|x - \hat x\|^2` per datapoint, :math:`\hat x = E[x \mid z=E_q z]` (VAE) or the AE output."""
    return torch.cat([(xb - net.reconstruct(xb)).pow(2).sum(-1) for xb in x.split(batch_size)])
