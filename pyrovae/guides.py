r"""Amortized variational posteriors $q_\phi(z \mid x)$, chosen by `model.guide.kind`.

`normal` (default): the encoder outputs $\mu_\phi(x)$ and $\sigma_\phi(x)$,
$q(z\mid x) = \mathcal N(\mu, \mathrm{diag}\,\sigma^2)$ (fully factorized Gaussian).

`flow`: the same Gaussian pushed through `layers` inverse autoregressive flow (IAF) layers,
$z = f_L \circ \dots \circ f_1(z_0)$, $z_0 \sim \mathcal N(\mu, \sigma^2)$
(Kingma et al., "Improved Variational Inference with Inverse Autoregressive Flow", 2016).
Sampling and scoring the sample are each one network pass per layer.
"""

from __future__ import annotations

from typing import Literal

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pydantic import Field
from torch import nn
from torch.nn.functional import softplus

from pyrovae.networks import build_network
from pyrovae.registry import Registry, Spec

GUIDES: Registry[Guide] = Registry("guide", group="pyrovae.guides")


class Guide(nn.Module):
    """Base: `encode(x) -> (loc, scale)`; `forward(x)` returns q(z|x) as a Pyro distribution."""

    Spec: type[Spec]

    def __init__(
        self, spec: Spec, encoder_spec: Spec, data_shape: tuple[int, ...], latent_dim: int
    ) -> None:
        super().__init__()
        self.spec, self.latent_dim = spec, latent_dim
        self.encoder = build_network(
            encoder_spec, data_shape, (2 * latent_dim,), name="model.encoder"
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gaussian part: $(\\mu_\\phi(x), \\sigma_\\phi(x))$."""
        h = self.encoder(x)
        loc, raw_scale = h[..., : self.latent_dim], h[..., self.latent_dim :]
        return loc, softplus(raw_scale) + 1e-5

    def forward(self, x: torch.Tensor) -> dist.TorchDistribution:  # pragma: no cover
        raise NotImplementedError


GUIDES.base = Guide


@GUIDES.register
class NormalGuide(Guide):
    r"""$q(z\mid x) = \mathcal N(\mu_\phi(x), \mathrm{diag}\,\sigma_\phi(x)^2)$."""

    class Spec(Spec):
        kind: Literal["normal"] = "normal"

    def forward(self, x):
        loc, scale = self.encode(x)
        return dist.Normal(loc, scale).to_event(1)


@GUIDES.register
class FlowGuide(Guide):
    r"""Amortized Gaussian followed by `layers` IAF transforms (with permutations)."""

    class Spec(Spec):
        kind: Literal["flow"] = "flow"
        layers: int = Field(2, ge=1)
        hidden: list[int] = [64]

    def __init__(self, spec, encoder_spec, data_shape, latent_dim):
        super().__init__(spec, encoder_spec, data_shape, latent_dim)
        hidden = [max(h, 2 * latent_dim) for h in spec.hidden]
        self.flows = nn.ModuleList(
            [T.affine_autoregressive(latent_dim, hidden_dims=hidden) for _ in range(spec.layers)]
        )
        perms = [
            torch.randperm(latent_dim, generator=torch.Generator().manual_seed(100 + i))
            for i in range(spec.layers)
        ]
        self.register_buffer("perms", torch.stack(perms))

    def forward(self, x):
        loc, scale = self.encode(x)
        transforms: list[T.Transform] = []
        for flow, perm in zip(self.flows, self.perms, strict=True):
            transforms += [flow, T.Permute(perm)]
        return dist.TransformedDistribution(dist.Normal(loc, scale).to_event(1), transforms)


def build_guide(
    spec: Spec, encoder_spec: Spec, data_shape: tuple[int, ...], latent_dim: int
) -> Guide:
    return GUIDES.build(spec, encoder_spec, data_shape, latent_dim)
