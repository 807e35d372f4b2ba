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
# # Lesson 3 notebook: over-complete and denoising autoencoders
#
# The [lesson page](../../lesson3-overcomplete/) derives it; this notebook runs it. Every number below comes
# from `pyrovae.teaching.overcomplete`. Set `SMOKE = True` (or the environment variable `PYROVAE_SMOKE=1`) for a
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
from pyrovae.teaching.overcomplete import overcomplete_lesson, plot_overcomplete

r = overcomplete_lesson(code_size=100, noise=0.3, epochs=3 if SMOKE else 100, seed=0, workdir=OUT)
oc, dn = r.overcomplete, r.denoising
print(f"{'':40}{'over-complete':>15}{'denoising':>12}")
print(f"{'test digits, ||x - x_hat||^2':40}{oc.test_error:>15.2e}{dn.test_error:>12.3f}")
print(f"{'uniform noise, ||u - u_hat||^2':40}{oc.noise_error:>15.3f}{dn.noise_error:>12.3f}")
print(
    f"{'||J - I||_F / ||I||_F on the top PCs':40}{oc.jacobian_error_data:>15.2e}{dn.jacobian_error_data:>12.3f}"
)

# %%
Image(filename=str(plot_overcomplete(r, OUT / "lesson3.png")))

# %% [markdown]
# ## Exercises
#
# Replace each `raise NotImplementedError` by your code and run the cell: `check` tests your
# function on random inputs against an independent computation.
# `pyrovae.teaching.solutions` holds reference answers.

# %%
from pyrovae.teaching.solutions import check

# %% [markdown]
# ### 3.1 The optimal linear denoiser
#
# For data with covariance $\Sigma = \sum_i \lambda_i u_i u_i^\top$ and noise $\mathcal N(0,\sigma^2 I)$,
# the best linear denoiser is $\Sigma(\Sigma+\sigma^2 I)^{-1}$. Return its gain along each $u_i$.


# %%
def optimal_gains(eigenvalues, sigma):
    """Gain along each principal direction, given the eigenvalues λ_i."""
    raise NotImplementedError  # your code here


check("3.1", optimal_gains)

# %% [markdown]
# ### 3.2 Does it copy?
#
# A linear autoencoder $x\mapsto W_\text{dec}(W_\text{enc}x+b)+c$ copies its input when its
# Jacobian is the identity. Return $\lVert J-I\rVert_F/\lVert I\rVert_F$.


# %%
def jacobian_error(w_enc, w_dec):
    """Relative Frobenius distance of the Jacobian from the identity."""
    raise NotImplementedError  # your code here


check("3.2", jacobian_error)
