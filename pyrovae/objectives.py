r"""Training objectives: which ``pyro.infer`` ELBO, and the β / KL warm-up schedule.

* ``trace_elbo`` (``Trace_ELBO``): :math:`\frac1K\sum_k \log p(x,z_k) - \log q(z_k|x)`,
  :math:`z_k\sim q`;
* ``mean_field`` (``TraceMeanField_ELBO``): :math:`E_q\log p(x|z) - \mathrm{KL}(q\|p)` with the
  KL analytic where registered;
* ``iwae`` (``RenyiELBO(alpha=0)``): :math:`\log \frac1K\sum_k p(x,z_k)/q(z_k|x)`
  (Burda et al. 2015).

All three are per-datapoint bounds on :math:`\log p(x)`; ``RenyiELBO`` keeps the plates shared by
all sites, so with ``pyro.plate("data")`` the IWAE bound is taken per datapoint (BRIEF §5).
"""

from __future__ import annotations

import pyro.infer

#: every pyrovae model has one plate ("data"); vectorized particles go to the dim left of it
MAX_PLATE_NESTING = 1


def make_elbo(objective: str = "trace_elbo", num_particles: int = 1) -> pyro.infer.ELBO:
    """The ``pyro.infer`` ELBO for ``train.objective`` with ``num_particles`` samples (vectorized)."""
    kw = dict(
        num_particles=num_particles,
        vectorize_particles=num_particles > 1,
        max_plate_nesting=MAX_PLATE_NESTING,
    )
    if objective == "trace_elbo":
        return pyro.infer.Trace_ELBO(**kw)
    if objective == "mean_field":
        return pyro.infer.TraceMeanField_ELBO(**kw)
    if objective == "iwae":
        return pyro.infer.RenyiELBO(alpha=0.0, **kw)
    raise ValueError(f"unknown objective {objective!r}: expected trace_elbo | mean_field | iwae")


def kl_scale(beta: float, warmup_epochs: int, progress_epochs: float) -> float:
    r"""β times a linear warm-up: :math:`\beta \min(1, t / T_\text{warm-up})` with ``t`` in epochs
    (fractional: it rises every step), so the KL term is switched on gradually (Bowman et al. 2016;
    Sønderby et al. 2016)."""
    if warmup_epochs <= 0:
        return beta
    return beta * min(1.0, progress_epochs / warmup_epochs)
