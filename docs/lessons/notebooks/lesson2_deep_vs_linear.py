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
# # Lesson 2 notebook: deep vs linear autoencoder
#
# The [lesson page](../../lesson2-deep-vs-linear/) derives it; this notebook runs it. Every number below comes
# from `pyrovae.teaching.deep_vs_linear`. Set `SMOKE = True` (or the environment variable `PYROVAE_SMOKE=1`) for a
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
from pyrovae.teaching.deep_vs_linear import deep_vs_linear_lesson, plot_deep_vs_linear

r = deep_vs_linear_lesson(
    code_sizes=(2,) if SMOKE else (2, 8), epochs=3 if SMOKE else 60, seed=0, workdir=OUT
)
print(
    f"digits: {r.n_train} training / {r.n_test} test images; deep AE 64-{'-'.join(map(str, r.hidden))}-k"
)
print(f"{'k':>3} {'linear AE':>10} {'PCA':>10} {'deep AE':>10}")
for c in r.results:
    print(f"{c.k:>3} {c.linear_error:>10.4f} {c.pca_error:>10.4f} {c.deep_error:>10.4f}")

# %%
Image(filename=str(plot_deep_vs_linear(r, OUT / "lesson2.png")))

# %% [markdown]
# ## Exercises
#
# Replace each `raise NotImplementedError` by your code and run the cell: `check` tests your
# function on random inputs against an independent computation.
# `pyrovae.teaching.solutions` holds reference answers.

# %%
from pyrovae.teaching.solutions import check

# %% [markdown]
# ### 2.1 Counting parameters
#
# A fully connected layer from $m$ to $n$ units has an $n\times m$ weight matrix and $n$ biases.
# Count the parameters of a network with layer widths `sizes`, e.g. `[64, 128, 64, 2]`.


# %%
def mlp_parameters(sizes):
    """Weights plus biases of the layers sizes[0] → sizes[1] → …"""
    raise NotImplementedError  # your code here


check("2.1", mlp_parameters)

# %% [markdown]
# ### 2.2 PCA on unseen data
#
# The table's PCA column is measured on *test* images: fit the mean and the top $k$ principal
# directions on `x_train`, project the centred `x_test` on them, and return the mean of
# $\lVert x-\hat x\rVert^2$ over test rows.


# %%
def pca_test_error(x_train, x_test, k):
    """Mean squared reconstruction error per test row of a k-component PCA fitted on x_train."""
    raise NotImplementedError  # your code here


check("2.2", pca_test_error)
