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
# # Lesson 5 notebook: p(x) is intractable
#
# The [lesson page](../../lesson5-intractable/) derives it; this notebook runs it. Every number below comes
# from `pyrovae.teaching.intractable`. Set `SMOKE = True` (or the environment variable `PYROVAE_SMOKE=1`) for a
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
from pyrovae.teaching.intractable import intractable_lesson, plot_intractable

if SMOKE:
    small = dict(
        latent_dims=(1,),
        n_images=2,
        ks=(1, 10, 100),
        epochs=2,
        repeats=2,
        elbo_particles=100,
        max_dim=3,
    )
else:
    small = dict(latent_dims=(1, 2), n_images=6)
r = intractable_lesson(seed=0, workdir=OUT, **small)
for p in r.per_dim:
    print(f"latent size d = {p.latent_dim}")
    print("  log p(x) (quadrature):", np.array2string(p.log_px, precision=4))
    print("  ELBO     (quadrature):", np.array2string(p.elbo, precision=4))
    print("  log p(x) - ELBO = KL(q || p(z|x)):", np.array2string(p.gap, precision=4))
    for k, pb, qb in zip(p.ks, p.prior_bias, p.is_bias, strict=True):
        print(f"  K = {k:>6}: naive MC bias {pb:+.4f}, IS from q bias {qb:+.4f}")
for d, ev in zip(r.dims, r.grid_evaluations, strict=True):
    print(f"grid for d = {d}: {ev:.3g} decoder evaluations")

# %%
Image(filename=str(plot_intractable(r, OUT / "lesson5.png")))

# %% [markdown]
# ## Exercises
#
# Replace each `raise NotImplementedError` by your code and run the cell: `check` tests your
# function on random inputs against an independent computation.
# `pyrovae.teaching.solutions` holds reference answers.

# %%
from pyrovae.teaching.solutions import check

# %% [markdown]
# ### 5.1 log-mean-exp
#
# Importance sampling estimates $\log p(x)\approx\log\frac1K\sum_k w_k$ from log-weights
# $\log w_k$ that may be around $-2000$. Compute it over the last axis without underflow or
# overflow.


# %%
def log_mean_exp(logw):
    """log(mean(exp(logw))) over the last axis, stably."""
    raise NotImplementedError  # your code here


check("5.1", log_mean_exp)

# %% [markdown]
# ### 5.2 Effective sample size
#
# The effective sample size $(\sum_k w_k)^2/\sum_k w_k^2$ says how many of the $K$ samples
# count. Compute it over the last axis, from log-weights.


# %%
def effective_sample_size(logw):
    """(sum w)^2 / sum w^2 over the last axis."""
    raise NotImplementedError  # your code here


check("5.2", effective_sample_size)
