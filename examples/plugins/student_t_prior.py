"""A Student-t prior, p(z) = prod_d StudentT(z_d | df, 0, scale): heavier tails than N(0, I).

Use it with `--plugin path/to/student_t_prior.py` and `prior = { kind = "student_t", df = 3 }`,
or, with this folder on PYTHONPATH, `prior = { kind = "student_t_prior:StudentT", df = 3 }`.
"""

from typing import Literal

import pyro.distributions as dist
import torch
from pydantic import Field

from pyrovae.priors import PRIORS, Prior
from pyrovae.registry import Spec


@PRIORS.register
class StudentT(Prior):
    """Independent Student-t coordinates (the KL to q(z|x) is estimated by sampling)."""

    class Spec(Spec):
        kind: Literal["student_t"] = "student_t"
        df: float = Field(3.0, gt=0)
        scale: float = Field(1.0, gt=0)

    def __init__(self, spec, latent_dim, data_dim, encode=None):
        super().__init__(spec, latent_dim, data_dim, encode)
        self.register_buffer("loc", torch.zeros(latent_dim))

    def forward(self):
        scale = torch.full_like(self.loc, self.spec.scale)
        return dist.StudentT(self.spec.df, self.loc, scale).to_event(1)
