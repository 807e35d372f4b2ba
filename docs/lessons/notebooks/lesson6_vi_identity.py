# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lesson 6 notebook: the VI identity on probabilistic PCA
#
# The [lesson page](../../lesson6-vi-identity/) derives it; this notebook runs it. Every number below comes
# from `pyrovae.teaching.vi_identity`. Set `SMOKE = True` (or the environment variable `PYROVAE_SMOKE=1`) for a
# small run of a few seconds: the numbers then differ from the lesson page's.

# %% tags=["parameters"]
import os

SMOKE = os.environ.get("PYROVAE_SMOKE") == "1"

# %%
import tempfile
from pathlib import Path

import numpy as np
import torch
from IPython.display import Image

torch.set_num_threads(1)  # tiny tensors: threads only add overhead
OUT = Path(tempfile.mkdtemp())

# %%
import pyro

from pyrovae.teaching.vi_identity import plot_vi_identity, vi_identity_lesson

pyro.enable_validation(True)
r = vi_identity_lesson(seed=0, **(dict(n_data=50, n_q=10, steps=100) if SMOKE else {}))
i = r.identity
print(f"pPCA: D = {r.D}, k = {r.k}, sigma = {r.sigma}; mean log p(x) = {r.log_px:.6f} nats")
print(f"max |log p(x) - ELBO - KL| over {i.n_q} random q: {i.max_abs_gap:.1e} nats")
print(f"exact posterior: max |ELBO - log p(x)| = {r.exact_elbo_gap:.1e}")
s = r.svi
print(
    f"SVI, {len(s.kl_exact)} steps: mean KL(q || p(z|x)) {s.kl_initial:.4f} -> {s.kl_final:.2e} nats"
)

# %%
Image(filename=str(plot_vi_identity(r, OUT / "lesson6.png")))

# %% [markdown]
# ## Exercises
#
# Replace each `raise NotImplementedError` by your code and run the cell: `check` tests your
# function on random inputs against an independent computation.
# `pyrovae.teaching.solutions` holds reference answers.

# %%
from pyrovae.teaching.solutions import check

# %% [markdown]
# ### 6.1 KL of two multivariate Gaussians
#
# $\mathrm{KL}(\mathcal N(m_0,S_0)\Vert\mathcal N(m_1,S_1)) = \tfrac12\big(\operatorname{tr}(S_1^{-1}S_0)
# + (m_1-m_0)^\top S_1^{-1}(m_1-m_0) - k + \log\det S_1 - \log\det S_0\big)$. Code it.


# %%
def mvn_kl(m0, s0, m1, s1):
    """KL(N(m0, S0) || N(m1, S1)) in nats."""
    raise NotImplementedError  # your code here


check("6.1", mvn_kl)

# %% [markdown]
# ### 6.2 The pPCA posterior
#
# For $z\sim\mathcal N(0,I_k)$, $x\mid z\sim\mathcal N(Wz+\mu,\sigma^2 I_D)$, return the mean and
# covariance of $p(z\mid x)$ (the lesson page gives them with $M = W^\top W+\sigma^2 I_k$).


# %%
def ppca_posterior(w, mu, sigma, x):
    """(mean, covariance) of p(z | x)."""
    raise NotImplementedError  # your code here


check("6.2", ppca_posterior)
