r"""The VAE as a Pyro program.

Generative model (`VAE.model`), for each datapoint $n$ in `pyro.plate("data")`:

$$
z_n \sim p_\theta(z), \qquad x_n \sim p_\theta(x \mid z_n) = \text{likelihood}(\text{decoder}_\theta(z_n))
$$

Amortized guide (`VAE.guide`): $z_n \sim q_\phi(z \mid x_n)$ from the encoder.

`Trace_ELBO` on this pair estimates, per datapoint,

$$
\mathrm{ELBO}(x) = E_{q(z|x)}[\log p(x\mid z)] - \mathrm{KL}(q(z\mid x)\,\|\,p(z)) \le \log p(x).
$$

Minibatches: `model(x, n_data=N)` with `len(x) = B` puts the sites in
`pyro.plate("data", N, subsample=...)` so Pyro scales the log densities by N/B, and the loss
is an unbiased estimate of the full-data negative ELBO. Divide by N for nats per datapoint.

β-VAE and KL warm-up: the argument `beta` multiplies $\log p(z)$ in the model and
$\log q(z|x)$ in the guide through `poutine.scale` on the latent site only, i.e. the loss
becomes $-E_q[\log p(x|z)] + \beta\,\mathrm{KL}$ (Higgins et al. 2017). The trainer passes it
to both, `elbo.differentiable_loss(vae.model, vae.guide, x, N, beta)`; `beta = 1` (the
default) is the plain ELBO.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pyrovae.guides import build_guide
from pyrovae.likelihoods import build_likelihood
from pyrovae.networks import build_network
from pyrovae.priors import build_prior
from pyrovae.registry import Registry

_ids = itertools.count()

#: whole Pyro models of the user's (`[model] kind = "package.module:ClassName"`): an `nn.Module`
#: built as `Class(spec)` from its validated `Spec`, with Pyro `model(x)` and `guide(x)` methods
#: whose per-datapoint sample sites are inside `pyro.plate("data")` (docs: Extending pyrovae)
MODELS: Registry[nn.Module] = Registry("model", group="pyrovae.models", base=nn.Module)


class VAE(nn.Module):
    """Variational autoencoder: `model`/`guide` are Pyro callables over a batch `x` of shape `(B, D)`.

    Build it from a validated `[model]` config section and the data's per-point shape:

    ```python
    vae = VAE(config.model, data_shape=(1, 8, 8))
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO())
    ```

    Both callables register the network with Pyro's parameter store (`pyro.module`), as
    `pyro.infer.SVI` with a `pyro.optim` optimizer needs; pyrovae's trainer optimizes
    `vae.parameters()` with a `torch.optim` optimizer on the ELBO's `differentiable_loss`.
    """

    def __init__(self, model_config, data_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.config, self.data_shape = model_config, tuple(data_shape)
        self.data_dim, self.latent_dim = math.prod(data_shape), model_config.latent_dim
        self.posterior = build_guide(
            model_config.guide, model_config.encoder, self.data_shape, self.latent_dim
        )
        self.likelihood = build_likelihood(model_config.likelihood, self.data_dim)
        k = self.likelihood.params_per_feature  # decoder output: k parameters per feature
        self.decoder = build_network(
            model_config.decoder,
            (self.latent_dim,),
            (k * self.data_shape[0], *self.data_shape[1:]),
            name="model.decoder",
        )
        self.prior = build_prior(
            model_config.prior, self.latent_dim, self.data_dim, self.posterior.encode
        )
        self.pyro_name = f"vae{next(_ids)}"
        self._index_cache: dict[tuple[int, torch.device], torch.Tensor] = {}

    # ---- the Pyro program -------------------------------------------------------------
    def _plate(self, x: torch.Tensor, n_data: int | None) -> pyro.plate:
        b = x.shape[0]
        if n_data is None or n_data == b:
            return pyro.plate("data", b, device=x.device)
        key = (b, x.device)
        idx = self._index_cache.get(key)
        if idx is None:
            idx = self._index_cache[key] = torch.arange(b, device=x.device)
        return pyro.plate("data", n_data, subsample=idx, device=x.device)

    def model(self, x: torch.Tensor, n_data: int | None = None, beta: float = 1.0) -> torch.Tensor:
        """p(x, z) = p(z) p(x|z); `x` is observed, `n_data` the dataset size when `x` is a
        minibatch, `beta` the weight of the latent site. Returns the sampled `z`."""
        pyro.module(self.pyro_name, self)
        with self._plate(x, n_data):
            prior = self.prior()
            with latent_weight(beta):
                z = pyro.sample("z", prior)
            raw = self.decoder(z)
            pyro.sample("x", self.likelihood(self._unflatten(raw)), obs=x)
        return z

    def guide(self, x: torch.Tensor, n_data: int | None = None, beta: float = 1.0) -> torch.Tensor:
        """q(z|x) from the encoder (same arguments as `model`). Returns the sampled `z`."""
        pyro.module(self.pyro_name, self)
        with self._plate(x, n_data):
            q = self.posterior(x)
            with latent_weight(beta):
                return pyro.sample("z", q)

    # ---- deterministic helpers (no Pyro effects) ---------------------------------------
    def _unflatten(self, raw: torch.Tensor) -> torch.Tensor:
        return raw.reshape(*raw.shape[:-1], self.likelihood.params_per_feature, self.data_dim)

    def likelihood_dist(self, z: torch.Tensor) -> dist.TorchDistribution:
        """p(x | z) as a distribution with event shape `(D,)`."""
        return self.likelihood(self._unflatten(self.decoder(z)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean code $E_q[z|x]$ (for the Gaussian guide: $\\mu_\\phi(x)$; for flows, a sample mean)."""
        if self.config.guide.kind == "normal":
            return self.posterior.encode(x)[0]
        return self.posterior(x).sample((64,)).mean(0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """$E[x \\mid z]$, shaped like the flattened data `(..., D)`."""
        return self.likelihood.mean(self._unflatten(self.decoder(z)))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """$E[x \\mid z = E_q[z|x]]$."""
        return self.decode(self.encode(x))

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True) -> torch.Tensor:
        """Draw `z ~ p(z)` and return $E[x|z]$ (`mean=True`) or a sample `x ~ p(x|z)`."""
        z = self.prior().sample((n,))
        return self.decode(z) if mean else self.likelihood_dist(z).sample()


def latent_weight(beta: float):
    """β on the latent site: `poutine.scale` (β > 0), `poutine.mask(False)` (β = 0)."""
    if beta == 1.0:
        return contextlib.nullcontext()
    if beta == 0.0:
        return poutine.mask(mask=False)
    return poutine.scale(scale=beta)
