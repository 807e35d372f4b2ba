r"""A Beta likelihood for grey levels in [0, 1], without binarizing.

$x_d \sim \mathrm{Beta}(\alpha_d(z), \beta_d(z))$ with $\alpha, \beta = \mathrm{softplus}(\cdot)$
of the decoder's two outputs per pixel. Beta densities live on the open interval (0, 1), while
image data hold exact 0s and 1s: the density is evaluated at $x$ clamped to
$[\varepsilon, 1 - \varepsilon]$ (option `eps`), so those pixels get the density of their
nearest interior value. (The continuous Bernoulli, built in, is exact on the closed interval.)

Use it with `--plugin path/to/beta_likelihood.py` and `likelihood = { kind = "beta" }`.
"""

from typing import Literal

import pyro.distributions as dist
import torch
from pydantic import Field
from torch.distributions import constraints
from torch.nn.functional import softplus

from pyrovae.errors import DataError
from pyrovae.likelihoods import LIKELIHOODS, Likelihood
from pyrovae.registry import Spec


class ClampedBeta(dist.Beta):
    """`Beta` whose support is the closed unit interval: values are clamped before scoring."""

    support = constraints.unit_interval
    eps = 1e-3

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return super().log_prob(value.clamp(self.eps, 1 - self.eps))


@LIKELIHOODS.register
class Beta(Likelihood):
    """Two decoder outputs per pixel: the Beta's concentrations."""

    params_per_feature = 2

    class Spec(Spec):
        kind: Literal["beta"] = "beta"
        eps: float = Field(1e-3, gt=0, lt=0.5)

    def forward(self, raw):
        alpha = softplus(raw[..., 0, :]) + 1e-3
        beta = softplus(raw[..., 1, :]) + 1e-3
        d = ClampedBeta(alpha, beta)
        d.eps = self.spec.eps
        return d.to_event(1)

    def check_data(self, x, source="data"):
        super().check_data(x, source)
        bad = (x < 0) | (x > 1)
        if bad.any():
            raise DataError(
                f"{source}: the beta likelihood needs grey levels in [0, 1]; found "
                f"{int(bad.sum())} value(s) outside, e.g. {x[bad][0].item():.4g}"
            )
