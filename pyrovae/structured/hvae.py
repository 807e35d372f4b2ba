r"""Hierarchical VAE with $L \ge 2$ stochastic layers (`[model] kind = "hvae"`).

`model.latent_dims = [d_1, ..., d_L]` lists the layers from the one next to the data ($z_1$)
to the top ($z_L$). Generative model, top-down, for each datapoint in `pyro.plate("data")`:

$$
z_L \sim p(z_L), \qquad
z_l \mid z_{l+1} \sim \mathcal N\big(\mu_l(z_{l+1}), \mathrm{diag}\,\sigma_l^2(z_{l+1})\big)
\ (l = L-1, \dots, 1), \qquad
x \mid z_1 \sim \text{likelihood}(\text{decoder}(z_1)).
$$

$p(z_L)$ is `model.prior` (any registered prior but the VampPrior), the likelihood and the
decoder $z_1 \to x$ are `model.likelihood` and `model.decoder`; each conditional
$p(z_l \mid z_{l+1})$ is a Gaussian whose mean and scale come from a small MLP
(`model.layer_hidden`).

Guide, bottom-up as in the two-stochastic-layer models of Burda et al., "Importance Weighted
Autoencoders" (ICLR 2016): $q(z_1 \mid x)$ is `model.guide` on `model.encoder` (a Gaussian or
an IAF flow), then $z_{l+1} \mid z_l \sim \mathcal N(\mu'_l(z_l), \mathrm{diag}\,\sigma'^2_l(z_l))$.
The ELBO splits into a reconstruction term and one KL term per layer,

$$
\mathrm{ELBO}(x) = E_q[\log p(x \mid z_1)]
- \sum_{l=1}^{L-1} E_q\big[\log q(z_l \mid z_{l-1}) - \log p(z_l \mid z_{l+1})\big]
- E_q\big[\log q(z_L \mid z_{L-1}) - \log p(z_L)\big] \qquad (z_0 = x),
$$

each term a Monte Carlo estimate on the same draw (`layer_terms`; `metrics` reports them as
`kl_z1`, ..., `kl_zL` and `reconstruction`, nats per datapoint). `Trace_ELBO` on the
program estimates the same sum; `mean_field` is not available (the KL of a layer has no closed
form given the sampled layer above).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import softplus

from pyrovae.guides import build_guide
from pyrovae.likelihoods import build_likelihood
from pyrovae.networks import MLP, build_network
from pyrovae.priors import build_prior
from pyrovae.structured import register
from pyrovae.structured.plates import data_plate, latent_weight

#: hidden sizes of the layer-to-layer MLPs when `model.layer_hidden` is not given
DEFAULT_LAYER_HIDDEN = [256]


class GaussianLayer(nn.Module):
    r"""A stochastic layer $\mathcal N(\mu(h), \mathrm{diag}\,\sigma^2(h))$, $(\mu, \log(e^\sigma - 1))$
    from one MLP of the conditioning value $h$."""

    def __init__(self, spec: MLP.Spec, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.net = build_network(spec, (in_dim,), (2 * out_dim,), name="model.layer_hidden")

    def params(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(h)
        return out[..., : self.out_dim], softplus(out[..., self.out_dim :]) + 1e-5

    def forward(self, h: torch.Tensor) -> dist.TorchDistribution:
        return dist.Normal(*self.params(h)).to_event(1)


@register("hvae")
class HVAE(nn.Module):
    """Hierarchical VAE; `model`/`guide` are Pyro callables over a batch `x` of shape `(B, D)`.

    Sample sites `z1` (next to the data) ... `zL` (top), and `x`.
    """

    uses_labels = False

    def __init__(self, model_config, data_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.config, self.data_shape = model_config, tuple(data_shape)
        self.data_dim = math.prod(self.data_shape)
        self.latent_dims = dims = list(model_config.latent_dims)
        self.latent_dim = dims[-1]  # the top layer's code (what `encode` returns)
        activation = getattr(model_config.encoder, "activation", "softplus")
        hidden = model_config.layer_hidden
        spec = MLP.Spec(
            hidden=list(DEFAULT_LAYER_HIDDEN if hidden is None else hidden), activation=activation
        )
        # q(z_1 | x), then q(z_{l+1} | z_l)
        self.posterior = build_guide(
            model_config.guide, model_config.encoder, self.data_shape, dims[0]
        )
        self.up = nn.ModuleList(
            GaussianLayer(spec, a, b) for a, b in zip(dims, dims[1:], strict=False)
        )
        # p(z_L), then p(z_l | z_{l+1}), then p(x | z_1)
        self.prior = build_prior(model_config.prior, dims[-1], self.data_dim, None)
        self.down = nn.ModuleList(
            GaussianLayer(spec, b, a) for a, b in zip(dims, dims[1:], strict=False)
        )
        self.likelihood = build_likelihood(model_config.likelihood, self.data_dim)
        p = self.likelihood.params_per_feature
        self.decoder = build_network(
            model_config.decoder,
            (dims[0],),
            (p * self.data_shape[0], *self.data_shape[1:]),
            name="model.decoder",
        )
        self.pyro_name = f"hvae{id(self)}"

    @property
    def depth(self) -> int:
        return len(self.latent_dims)

    # ---- the Pyro program -------------------------------------------------------------
    def model(self, x: torch.Tensor, y=None, n_data: int | None = None, beta: float = 1.0):
        """p(z_L) ... p(z_1 | z_2) p(x | z_1), top-down. Returns the sampled `z1`."""
        pyro.module(self.pyro_name, self)
        with data_plate(x, n_data):
            with latent_weight(beta):
                z = pyro.sample(f"z{self.depth}", self.prior())
                for layer in range(self.depth - 1, 0, -1):  # z_{L-1} ... z_1
                    z = pyro.sample(f"z{layer}", self.down[layer - 1](z))
            pyro.sample("x", self.likelihood_dist(z), obs=x)
        return z

    def guide(self, x: torch.Tensor, y=None, n_data: int | None = None, beta: float = 1.0):
        """q(z_1 | x) q(z_2 | z_1) ... q(z_L | z_{L-1}), bottom-up. Returns the sampled `zL`."""
        pyro.module(self.pyro_name, self)
        with data_plate(x, n_data):
            with latent_weight(beta):
                z = pyro.sample("z1", self.posterior(x))
                for layer in range(2, self.depth + 1):
                    z = pyro.sample(f"z{layer}", self.up[layer - 2](z))
        return z

    # ---- deterministic pieces (no Pyro effects) ----------------------------------------
    def _unflatten(self, raw: torch.Tensor) -> torch.Tensor:
        return raw.reshape(*raw.shape[:-1], self.likelihood.params_per_feature, self.data_dim)

    def likelihood_dist(self, z1: torch.Tensor) -> dist.TorchDistribution:
        """p(x | z_1) with event shape `(D,)`."""
        return self.likelihood(self._unflatten(self.decoder(z1)))

    def decode(self, z1: torch.Tensor) -> torch.Tensor:
        """$E[x \\mid z_1]$, shape `(..., D)`."""
        return self.likelihood.mean(self._unflatten(self.decoder(z1)))

    def encode_layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The mean path up the guide: $m_1 = E_q[z_1|x]$, $m_{l+1} = \\mu'_l(m_l)$."""
        if self.config.guide.kind == "normal":
            m = self.posterior.encode(x)[0]
        else:
            m = self.posterior(x).sample((64,)).mean(0)
        out = [m]
        for up in self.up:
            m = up.params(m)[0]
            out.append(m)
        return out

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The top layer's code on the mean path up the guide (see `encode_layers`)."""
        return self.encode_layers(x)[-1]

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """$E[x \\mid z_1 = E_q[z_1|x]]$."""
        return self.decode(self.encode_layers(x)[0])

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True) -> torch.Tensor:
        """Ancestral draw $z_L \\sim p(z_L)$, ..., $z_1 \\sim p(z_1|z_2)$; returns $E[x|z_1]$
        (or a draw of x)."""
        z = self.prior().sample((n,))
        for layer in range(self.depth - 1, 0, -1):
            z = self.down[layer - 1](z).sample()
        return self.decode(z) if mean else self.likelihood_dist(z).sample()

    def layer_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        r"""One draw $z_{1:L} \sim q(\cdot \mid x)$ and the ELBO's terms on it, per datapoint:
        `reconstruction` $\log p(x|z_1)$ and `kl_z1` ... `kl_zL`,
        $\log q(z_l \mid z_{l-1}) - \log p(z_l \mid z_{l+1})$ (top: $- \log p(z_L)$). Their
        combination `reconstruction - sum(kl)` is the single-sample ELBO estimate."""
        q = self.posterior(x)
        zs = [q.rsample()]
        log_q = [q.log_prob(zs[0])]
        for up in self.up:
            qz = up(zs[-1])
            zs.append(qz.rsample())
            log_q.append(qz.log_prob(zs[-1]))
        log_p = [self.down[i](zs[i + 1]).log_prob(zs[i]) for i in range(self.depth - 1)]
        log_p.append(self.prior().log_prob(zs[-1]))
        out = {"reconstruction": self.likelihood_dist(zs[0]).log_prob(x)}
        for i in range(self.depth):
            out[f"kl_z{i + 1}"] = log_q[i] - log_p[i]
        return out

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, float]:
        """Mean over `x` of the per-layer terms of `layer_terms` (nats per datapoint; one
        draw per point)."""
        sums: dict[str, float] = {}
        for xb in x.split(4096):
            for k, v in self.layer_terms(xb).items():
                sums[k] = sums.get(k, 0.0) + float(v.double().sum())
        return {k: v / len(x) for k, v in sums.items()}
