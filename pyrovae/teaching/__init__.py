"""The teaching track: every step of the lecture "autoencoders → VAEs", runnable and checked.

Each lesson module has functions returning a small result dataclass with the lesson's numbers,
and a ``plot_*`` function drawing its figure. ``examples/lessonN_*.py`` print the numbers and
write the figure; ``tests/test_teaching_*.py`` assert the claims; ``docs/lessons/`` derive them.

* [`pyrovae.teaching.linear_ae`][pyrovae.teaching.linear_ae] — lesson 1, a linear autoencoder learns PCA's subspace.
* [`pyrovae.teaching.information`][pyrovae.teaching.information] — lesson 4, information, entropy and KL divergence.
* [`pyrovae.teaching.ppca`][pyrovae.teaching.ppca] — probabilistic PCA in closed form, as a Pyro model with guides
  (also the exact test bed for ELBO/KL/log-likelihood estimators).
* [`pyrovae.teaching.vi_identity`][pyrovae.teaching.vi_identity] — lesson 6, log p(x) = ELBO(q) + KL(q ‖ p(z|x)).
"""

from pyrovae.teaching.information import information_lesson, plot_information
from pyrovae.teaching.linear_ae import linear_ae_lesson, plot_linear_ae
from pyrovae.teaching.ppca import (
    PPCA,
    diagonal_guide,
    elbo_closed_form,
    elbo_terms,
    exact_guide,
    exact_kl_to_posterior,
    fixed_gaussian_guide,
    gaussian_guide,
    learnable_gaussian_guide,
    perturbed_guide,
    perturbed_posterior,
)
from pyrovae.teaching.vi_identity import plot_vi_identity, vi_identity_lesson

__all__ = [
    "PPCA",
    "diagonal_guide",
    "elbo_closed_form",
    "elbo_terms",
    "exact_guide",
    "exact_kl_to_posterior",
    "fixed_gaussian_guide",
    "gaussian_guide",
    "information_lesson",
    "learnable_gaussian_guide",
    "linear_ae_lesson",
    "perturbed_guide",
    "perturbed_posterior",
    "plot_information",
    "plot_linear_ae",
    "plot_vi_identity",
    "vi_identity_lesson",
]
