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
# # Lesson 1 notebook: a linear autoencoder learns PCA
#
# The [lesson page](../../lesson1-linear-ae-pca/) derives it; this notebook runs it. Every number below comes
# from `pyrovae.teaching.linear_ae`. Set `SMOKE = True` (or the environment variable `PYROVAE_SMOKE=1`) for a
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
from pyrovae.teaching.linear_ae import linear_ae_lesson, plot_linear_ae

r = linear_ae_lesson(k=8, seed=0, max_iter=150 if SMOKE else 1000)
print(f"digits: N = {r.n}, D = 64, code size k = {r.k}")
print(f"PCA residual (sum of discarded eigenvalues): {r.pca_residual:.6f}")
print(f"tied linear AE:   {r.tied_error:.6f}  (relative to PCA {r.tied_rel_error:+.2e})")
print(f"untied linear AE: {r.untied_error:.6f}  (relative to PCA {r.untied_rel_error:+.2e})")
print(
    f"largest principal angle to PCA: tied {r.tied_max_angle_deg:.2e}°, untied {r.untied_max_angle_deg:.2e}°"
)

# %%
Image(filename=str(plot_linear_ae(r, OUT / "lesson1.png")))

# %% [markdown]
# ## Exercises
#
# Replace each `raise NotImplementedError` by your code and run the cell: `check` tests your
# function on random inputs against an independent computation.
# `pyrovae.teaching.solutions` holds reference answers.

# %%
from pyrovae.teaching.solutions import check

# %% [markdown]
# ### 1.1 PCA's error
#
# PCA with $k$ components reconstructs the centred data with mean squared error
# $\sum_{j>k}\lambda_j$, the sum of the discarded eigenvalues of the covariance
# $\frac1N\sum_n (x_n-\bar x)(x_n-\bar x)^\top$. Compute it.


# %%
def pca_residual(x, k):
    """Sum of the discarded eigenvalues; `x` is an (N, D) float64 tensor."""
    raise NotImplementedError  # your code here


check("1.1", pca_residual)

# %% [markdown]
# ### 1.2 Principal angles
#
# The lesson compares subspaces by their largest principal angle. With orthonormal bases $Q_a$,
# $Q_b$, the cosines of the angles are the singular values of $Q_a^\top Q_b$. Return the largest
# angle in degrees.


# %%
def largest_principal_angle(a, b):
    """Largest angle between the column spaces of `a` and `b`, in degrees."""
    raise NotImplementedError  # your code here


check("1.2", largest_principal_angle)
