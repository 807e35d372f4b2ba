r"""The deterministic autoencoder baseline: same encoder/decoder builders, no distributions.

$\hat x = g_\theta(f_\phi(x))$, trained with a torch optimizer on the reconstruction loss
that matches the likelihood (squared error for `normal`, cross-entropy for `bernoulli` and
`continuous_bernoulli`, $-\log p(x\mid\hat x)$ otherwise). Variants:

* `deep` — the configured networks;
* `linear` — no hidden layers; its optimum spans the principal subspace (Baldi & Hornik 1989);
* `overcomplete` — code size larger than the input: it can learn to copy its input;
* `denoising` — Gaussian noise of std `noise` is added to the input while training, which
  removes the copy solution (Vincent et al. 2008).

An autoencoder has no prior, so "decoding a draw from N(0, I)" is not sampling from a model; the
CLI shows such decodes next to the VAE's samples to make that visible.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pyrovae.errors import ConfigError
from pyrovae.likelihoods import build_likelihood
from pyrovae.networks import Linear, build_network


class AutoEncoder(nn.Module):
    """Deterministic autoencoder with the same builders as `pyrovae.VAE`."""

    def __init__(self, model_config, data_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.config, self.data_shape = model_config, tuple(data_shape)
        self.data_dim, self.latent_dim = math.prod(data_shape), model_config.latent_dim
        self.variant, self.noise = model_config.variant, model_config.noise
        if self.variant == "overcomplete" and self.latent_dim <= self.data_dim:
            raise ConfigError(
                f'model.latent_dim must exceed the data dimension for variant = "overcomplete": '
                f"expected > {self.data_dim}, got {self.latent_dim}"
            )
        enc_spec, dec_spec = model_config.encoder, model_config.decoder
        if self.variant == "linear":
            enc_spec = dec_spec = Linear.Spec()
        self.likelihood = build_likelihood(model_config.likelihood, self.data_dim)
        k = self.likelihood.params_per_feature  # decoder output: k parameters per feature
        self.encoder = build_network(
            enc_spec, self.data_shape, (self.latent_dim,), name="model.encoder"
        )
        self.decoder = build_network(
            dec_spec,
            (self.latent_dim,),
            (k * self.data_shape[0], *self.data_shape[1:]),
            name="model.decoder",
        )

    def _raw(self, z: torch.Tensor) -> torch.Tensor:
        raw = self.decoder(z)
        return raw.reshape(*raw.shape[:-1], self.likelihood.params_per_feature, self.data_dim)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.likelihood.mean(self._raw(z))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean over the batch of the per-datapoint reconstruction loss (noisy input if denoising)."""
        inp = x
        if self.variant == "denoising" and self.training and self.noise > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            inp = x + self.noise * noise
        return self.likelihood.reconstruction_loss(self._raw(self.encode(inp)), x).mean()

    @torch.no_grad()
    def decode_prior_draws(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode z ~ N(0, I): what you get if you treat an AE like a generative model."""
        z = torch.randn(n, self.latent_dim, generator=generator)
        return self.decode(z.to(next(self.parameters()).device))
