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
# # Lesson 7 notebook: AE vs VAE objectives
#
# The [lesson page](../../lesson7-ae-vs-vae/) derives it; this notebook runs it. Every number below comes
# from `pyrovae.teaching.ae_vs_vae`. Set `SMOKE = True` (or the environment variable `PYROVAE_SMOKE=1`) for a
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
from pyrovae.teaching.ae_vs_vae import ae_vs_vae_lesson, plot_ae_vs_vae

r = ae_vs_vae_lesson(
    latent_dim=2, scale=0.3, seed=0, workdir=OUT, **(dict(epochs=3, n_identity=32) if SMOKE else {})
)
i = r.identity
print(f"identity on {i.n} test images: max |formula - Pyro trace| = {i.max_abs_diff:.1e}")
print(f"test ||x - x_hat||^2: AE {r.ae_error:.4f}, VAE {r.vae_error:.4f}")
for name, c in (("AE codes", r.ae_codes), ("VAE aggregate posterior", r.vae_codes)):
    print(
        f"{name:>24}: mean {np.array2string(c.mean, precision=3)}, var {np.array2string(c.var, precision=3)}"
    )

# %%
Image(filename=str(plot_ae_vs_vae(r, OUT / "lesson7.png")))

# %% [markdown]
# ## Exercises
#
# Replace each `raise NotImplementedError` by your code and run the cell: `check` tests your
# function on random inputs against an independent computation.
# `pyrovae.teaching.solutions` holds reference answers.

# %%
from pyrovae.teaching.solutions import check

# %% [markdown]
# ### 7.1 The Gaussian ELBO
#
# With likelihood $\mathcal N(\hat x,\sigma^2 I_D)$ and one $z$ per image,
# $-\mathrm{ELBO} = \lVert x-\hat x\rVert^2/2\sigma^2 + \mathrm{KL} + \frac D2\log 2\pi\sigma^2$.
# Compute it per image from the squared errors and KLs.


# %%
def negative_elbo(squared_error, kl, sigma, d):
    """-ELBO per image."""
    raise NotImplementedError  # your code here


check("7.1", negative_elbo)

# %% [markdown]
# ### 7.2 KL to the prior
#
# The encoder outputs $\mu$ and $\log\sigma^2$ per latent dimension. Return
# $\mathrm{KL}(\mathcal N(\mu,\operatorname{diag}\sigma^2)\Vert\mathcal N(0,I))$ per row.


# %%
def kl_to_standard_normal(mu, log_var):
    """KL to N(0, I) per row, summed over latent dimensions."""
    raise NotImplementedError  # your code here


check("7.2", kl_to_standard_normal)
