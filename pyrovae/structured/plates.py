r"""The two program pieces every structured model shares with `pyrovae.VAE`.

* `data_plate(x, n_data)`: `pyro.plate("data", N, subsample=arange(B))` for a minibatch `x` of
  `B` out of `N` points, so Pyro scales every per-datapoint log density by $N/B$ and the loss
  is an unbiased estimate of the full-data negative ELBO (`pyro.plate("data", B)` when `n_data`
  is `None` or `B`).
* `latent_weight(beta)` (`pyrovae.model`'s): β on the latent sites, `poutine.scale(beta)` (β > 0) or
  `poutine.mask(False)` (β = 0), i.e. $-E_q[\log p(x|z)] + \beta\,\mathrm{KL}$.
"""

from __future__ import annotations

import pyro
import torch

from pyrovae.model import latent_weight

__all__ = ["data_plate", "latent_weight"]


def data_plate(x: torch.Tensor, n_data: int | None) -> pyro.plate:
    """The data plate over the batch `x` (subsampled from `n_data` points when given)."""
    b = x.shape[0]
    if n_data is None or n_data == b:
        return pyro.plate("data", b, device=x.device)
    idx = torch.arange(b, device=x.device)
    return pyro.plate("data", n_data, subsample=idx, device=x.device)
