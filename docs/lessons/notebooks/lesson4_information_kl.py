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
# # Lesson 4 notebook: information and KL divergence
#
# The [lesson page](../../lesson4-information-kl/) derives it; this notebook runs it. Every number below comes
# from `pyrovae.teaching.information`. Set `SMOKE = True` (or the environment variable `PYROVAE_SMOKE=1`) for a
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
from pyrovae.teaching.information import information_lesson, plot_information

r = information_lesson(seed=0, mc_repeats=3 if SMOKE else 20)
print(f"p = {r.p}, q = {r.q}")
print(f"H(p) = {r.entropy_p_nats:.4f} nats = {r.entropy_p_bits:.4f} bits")
print(
    f"KL(p||q) = {r.kl_pq_nats:.6f} nats (torch {r.kl_pq_torch:.6f}); KL(q||p) = {r.kl_qp_nats:.6f} nats"
)
g = r.gibbs
print(
    f"Gibbs' inequality on {g.n_pairs} random pairs: smallest KL {g.min_kl:.2e}, {g.n_negative} negative"
)
mc = r.mc
for n, e, s in zip(mc.ns, mc.estimates, mc.stderrs, strict=True):
    print(f"Monte Carlo, n = {n:>6d}: {e:.4f} ± {s:.4f} (exact {mc.exact:.4f})")

# %%
Image(filename=str(plot_information(r, OUT / "lesson4.png")))

# %% [markdown]
# ## Exercises
#
# Replace each `raise NotImplementedError` by your code and run the cell: `check` tests your
# function on random inputs against an independent computation.
# `pyrovae.teaching.solutions` holds reference answers.

# %%
from pyrovae.teaching.solutions import check

# %% [markdown]
# ### 4.1 KL in bits
#
# $\mathrm{KL}(p\Vert q) = \sum_i p_i \log_2 (p_i/q_i)$ bits for two categorical distributions
# given as probability vectors.


# %%
def kl_bits(p, q):
    """KL(p || q) in bits."""
    raise NotImplementedError  # your code here


check("4.1", kl_bits)

# %% [markdown]
# ### 4.2 KL of two Gaussians
#
# Derive and code $\mathrm{KL}(\mathcal N(m_1,s_1^2)\Vert\mathcal N(m_2,s_2^2))$ in nats (standard
# deviations $s_1, s_2$).


# %%
def gaussian_kl(m1, s1, m2, s2):
    """KL(N(m1, s1^2) || N(m2, s2^2)) in nats."""
    raise NotImplementedError  # your code here


check("4.2", gaussian_kl)
