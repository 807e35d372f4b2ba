"""The teaching track: every step of the lecture "autoencoders → VAEs", runnable and checked.

Each lesson module has functions returning a small result dataclass with the lesson's numbers,
and a `plot_*` function drawing its figure. `examples/lessonN_*.py` print the numbers and
write the figure; `tests/test_teaching_*.py` assert the claims; `docs/lessons/` derive them.

* [`pyrovae.teaching.linear_ae`][pyrovae.teaching.linear_ae] — lesson 1, a linear autoencoder learns PCA's subspace.
* [`pyrovae.teaching.deep_vs_linear`][pyrovae.teaching.deep_vs_linear] — lesson 2, a deep autoencoder beats the linear one
  (and PCA) at the same code size.
* [`pyrovae.teaching.overcomplete`][pyrovae.teaching.overcomplete] — lesson 3, an over-complete autoencoder copies its
  input (Jacobian ≈ I); a denoising one does not.
* [`pyrovae.teaching.information`][pyrovae.teaching.information] — lesson 4, information, entropy and KL divergence.
* [`pyrovae.teaching.intractable`][pyrovae.teaching.intractable] — lesson 5, log p(x) by quadrature against naive
  Monte Carlo, importance sampling and the ELBO; the grid's cost n^d.
* [`pyrovae.teaching.ppca`][pyrovae.teaching.ppca] — probabilistic PCA in closed form, as a Pyro model with guides
  (also the exact test bed for ELBO/KL/log-likelihood estimators).
* [`pyrovae.teaching.vi_identity`][pyrovae.teaching.vi_identity] — lesson 6, log p(x) = ELBO(q) + KL(q ‖ p(z|x)).
* [`pyrovae.teaching.ae_vs_vae`][pyrovae.teaching.ae_vs_vae] — lesson 7, ‖x − x̂‖² against
  ‖x − x̂‖²/2σ² + KL, codes and samples.
* [`pyrovae.teaching.solutions`][pyrovae.teaching.solutions] — the exercises at the end of the
  lesson notebooks (`docs/lessons/notebooks/`), their reference answers and checks.
"""

from pyrovae.teaching.ae_vs_vae import ae_vs_vae_lesson, gaussian_elbo_identity, plot_ae_vs_vae
from pyrovae.teaching.deep_vs_linear import deep_vs_linear_lesson, plot_deep_vs_linear
from pyrovae.teaching.information import information_lesson, plot_information
from pyrovae.teaching.intractable import intractable_lesson, plot_intractable, quadrature
from pyrovae.teaching.linear_ae import linear_ae_lesson, plot_linear_ae
from pyrovae.teaching.overcomplete import overcomplete_lesson, plot_overcomplete
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
    "ae_vs_vae_lesson",
    "deep_vs_linear_lesson",
    "diagonal_guide",
    "elbo_closed_form",
    "elbo_terms",
    "exact_guide",
    "exact_kl_to_posterior",
    "fixed_gaussian_guide",
    "gaussian_elbo_identity",
    "gaussian_guide",
    "information_lesson",
    "intractable_lesson",
    "learnable_gaussian_guide",
    "linear_ae_lesson",
    "overcomplete_lesson",
    "perturbed_guide",
    "perturbed_posterior",
    "plot_ae_vs_vae",
    "plot_deep_vs_linear",
    "plot_information",
    "plot_intractable",
    "plot_linear_ae",
    "plot_overcomplete",
    "plot_vi_identity",
    "quadrature",
    "vi_identity_lesson",
]
