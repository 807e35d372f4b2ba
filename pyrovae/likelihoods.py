r"""Likelihoods $p(x \mid z)$, chosen by `model.likelihood.kind`.

The decoder outputs `params_per_feature` raw numbers per data feature, shaped
`(..., params_per_feature, D)`; a likelihood turns them into a `pyro.distributions` object
with `event_shape == (D,)`. Each likelihood also checks, once per dataset, that the data lies in
its support, so that Pyro's validation (which stays on) never has to fail deep inside a step.

* `bernoulli` — $\prod_d \lambda_d^{x_d}(1-\lambda_d)^{1-x_d}$; binary data {0, 1}.
* `bernoulli_cross_entropy` — the same formula on grey levels in [0, 1]: a cross-entropy, not
  a normalized density (the loss of Pyro's CVAE example and of much VAE code on grey MNIST).
* `continuous_bernoulli` — $\prod_d C(\lambda_d)\lambda_d^{x_d}(1-\lambda_d)^{1-x_d}$;
  grey levels in [0, 1].
* `normal` — $\prod_d \mathcal N(x_d; \mu_d, \sigma^2)$; real values.
* `laplace` — $\prod_d \tfrac{1}{2b} e^{-|x_d-\mu_d|/b}$; real values, robust.
* `poisson` — $\prod_d \mathrm{Poisson}(x_d; r_d)$; counts.
* `negative_binomial` — $\prod_d \mathrm{NB}(x_d; r_d, p_d)$ with learned
  $r_d$; over-dispersed counts.
"""

from __future__ import annotations

from typing import Annotated, Literal

import pyro.distributions as dist
import torch
from pydantic import Field
from torch import nn
from torch.distributions.utils import broadcast_all
from torch.nn.functional import binary_cross_entropy_with_logits, softplus

from pyrovae.errors import DataError
from pyrovae.registry import Registry, Spec

LIKELIHOODS: Registry[Likelihood] = Registry("likelihood", group="pyrovae.likelihoods")

#: a fixed positive observation scale, or "learned" (one learned scale per feature)
Scale = Annotated[float, Field(gt=0)] | Literal["learned"]


def _describe(x: torch.Tensor, bad: torch.Tensor) -> str:
    idx = bad.nonzero()[0].tolist()
    vals = x[bad]
    return (
        f"{int(bad.sum())} value(s) out of {x.numel()}, e.g. {x[tuple(idx)].item():.4g} at index "
        f"{tuple(idx)}; observed range [{vals.min().item():.4g}, {vals.max().item():.4g}]"
    )


class Likelihood(nn.Module):
    """Base class: `forward(raw)` returns p(x|z); `check_data` validates a dataset once."""

    Spec: type[Spec]
    params_per_feature = 1

    def __init__(self, spec: Spec, dim: int) -> None:
        super().__init__()
        self.spec, self.dim = spec, dim

    def forward(self, raw: torch.Tensor) -> dist.TorchDistribution:  # pragma: no cover
        raise NotImplementedError

    def mean(self, raw: torch.Tensor) -> torch.Tensor:
        """$E[x \\mid z]$ — what reconstructions and samples show."""
        return self(raw).mean

    def reconstruction_loss(self, raw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The autoencoder's loss per datapoint: $-\\log p(x \\mid \\hat x)$ by default."""
        return -self(raw).log_prob(x)

    def check_data(self, x: torch.Tensor, source: str = "data") -> None:
        """Raise `DataError` naming `source` if `x` is outside this likelihood's support."""
        bad = ~torch.isfinite(x)
        if bad.any():
            raise DataError(
                f"{source}: {self.spec.kind} likelihood needs finite values; found NaN/inf: {_describe(x, bad)}"
            )


class _Binary(Likelihood):
    def check_data(self, x, source="data"):
        super().check_data(x, source)
        bad = (x != 0) & (x != 1)
        if bad.any():
            grey = bool(((x >= 0) & (x <= 1)).all())
            hint = (
                ' The data are grey levels in [0, 1]: set data.binarize = "dynamic" (or "static") '
                'or use model.likelihood.kind = "continuous_bernoulli".'
                if grey
                else ""
            )
            raise DataError(
                f"{source}: the bernoulli likelihood needs values in {{0, 1}}; found {_describe(x, bad)}.{hint}"
            )


LIKELIHOODS.base = Likelihood


@LIKELIHOODS.register
class Bernoulli(_Binary):
    r"""Binary pixels: $x_d \sim \mathrm{Bernoulli}(\sigma(\ell_d))$; for grey levels binarize first."""

    class Spec(Spec):
        kind: Literal["bernoulli"] = "bernoulli"

    def forward(self, raw):
        return dist.Bernoulli(logits=raw[..., 0, :]).to_event(1)

    def mean(self, raw):
        return torch.sigmoid(raw[..., 0, :])

    def reconstruction_loss(self, raw, x):
        """Binary cross-entropy summed over features."""
        logits, x = broadcast_all(raw[..., 0, :], x)
        return binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)


class _UnitInterval(Likelihood):
    def check_data(self, x, source="data"):
        super().check_data(x, source)
        bad = (x < 0) | (x > 1)
        if bad.any():
            raise DataError(
                f"{source}: the {self.spec.kind} likelihood needs values in [0, 1]; found {_describe(x, bad)}"
            )


@LIKELIHOODS.register
class BernoulliCrossEntropy(_UnitInterval):
    r"""Grey levels $x_d \in [0, 1]$ scored by the Bernoulli cross-entropy
    $\sum_d x_d \log\lambda_d + (1-x_d)\log(1-\lambda_d)$, $\lambda = \sigma(\ell)$.

    Not a normalized density on $[0, 1]$ (that is `continuous_bernoulli`): its "NLL" is only
    comparable with other figures of the same cross-entropy on the same grey levels, such as
    Pyro's CVAE example. It is a `pyro.distributions.Bernoulli` with `validate_args=False`, asked
    for by name, so that grey data under plain `bernoulli` is still refused."""

    class Spec(Spec):
        kind: Literal["bernoulli_cross_entropy"] = "bernoulli_cross_entropy"

    def forward(self, raw):
        return dist.Bernoulli(logits=raw[..., 0, :], validate_args=False).to_event(1)

    mean = Bernoulli.mean
    reconstruction_loss = Bernoulli.reconstruction_loss


@LIKELIHOODS.register
class ContinuousBernoulli(_UnitInterval):
    r"""Grey levels in [0, 1], properly normalized (Loaiza-Ganem & Cunningham 2019):
    $p(x\mid\lambda) = C(\lambda)\lambda^x(1-\lambda)^{1-x}$,
    $C(\lambda) = 2\,\mathrm{artanh}(1-2\lambda)/(1-2\lambda)$."""

    class Spec(Spec):
        kind: Literal["continuous_bernoulli"] = "continuous_bernoulli"

    def forward(self, raw):
        return dist.ContinuousBernoulli(
            logits=raw[..., 0, :]
        ).to_event(1)


class _LocationScale(Likelihood):
    """`scale` fixed (a positive number) or `"learned"` (one learned scale per feature)."""

    family: type[dist.TorchDistribution]

    def __init__(self, spec, dim):
        super().__init__(spec, dim)
        if spec.scale == "learned":
            self.log_scale = nn.Parameter(torch.zeros(dim))
        else:
            self.register_buffer("fixed_scale", torch.full((dim,), float(spec.scale)))

    def scale(self) -> torch.Tensor:
        return self.log_scale.exp() if self.spec.scale == "learned" else self.fixed_scale

    def forward(self, raw):
        return self.family(raw[..., 0, :], self.scale()).to_event(
            1
        )

    def mean(self, raw):
        return raw[..., 0, :]


@LIKELIHOODS.register
class Normal(_LocationScale):
    r"""$x_d \sim \mathcal N(\mu_d(z), \sigma^2)$; $-\log p = \|x-\mu\|^2/2\sigma^2 + \text{const}$."""

    family = dist.Normal

    class Spec(Spec):
        kind: Literal["normal"] = "normal"
        scale: Scale = 0.1

    def reconstruction_loss(self, raw, x):
        """Squared error $\\|x - \\hat x\\|^2$ summed over features."""
        return (x - raw[..., 0, :]).pow(2).sum(-1)


@LIKELIHOODS.register
class Laplace(_LocationScale):
    r"""$x_d \sim \mathrm{Laplace}(\mu_d(z), b)$: robust to outliers (L1 reconstruction)."""

    family = dist.Laplace

    class Spec(Spec):
        kind: Literal["laplace"] = "laplace"
        scale: Scale = 0.1


class _Counts(Likelihood):
    def check_data(self, x, source="data"):
        super().check_data(x, source)
        bad = (x < 0) | (x != x.round())
        if bad.any():
            raise DataError(
                f"{source}: the {self.spec.kind} likelihood needs non-negative integer counts; found {_describe(x, bad)}"
            )


@LIKELIHOODS.register
class Poisson(_Counts):
    r"""$x_d \sim \mathrm{Poisson}(r_d(z))$, $r = \mathrm{softplus}(\text{raw})$."""

    class Spec(Spec):
        kind: Literal["poisson"] = "poisson"

    def forward(self, raw):
        rate = softplus(raw[..., 0, :]) + 1e-6
        return dist.Poisson(rate).to_event(1)


@LIKELIHOODS.register
class NegativeBinomial(_Counts):
    r"""$x_d \sim \mathrm{NB}(r_d, \mathrm{logits}_d(z))$ with a learned dispersion
    $r_d$ per feature (as for over-dispersed counts in scVI)."""

    class Spec(Spec):
        kind: Literal["negative_binomial"] = "negative_binomial"

    def __init__(self, spec, dim):
        super().__init__(spec, dim)
        self.raw_total_count = nn.Parameter(torch.zeros(dim))

    def forward(self, raw):
        total = softplus(self.raw_total_count) + 1e-4
        return dist.NegativeBinomial(
            total_count=total, logits=raw[..., 0, :]
        ).to_event(1)


def build_likelihood(spec: Spec, dim: int) -> Likelihood:
    return LIKELIHOODS.build(spec, dim)
