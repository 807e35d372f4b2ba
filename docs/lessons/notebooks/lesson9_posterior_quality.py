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
# # Lesson 9 notebook: is my posterior any good?
#
# Training maximizes the ELBO, and a good ELBO says the *model* fits. It says little about
# whether $q_\phi(z\mid x)$ is close to the true posterior $p(z\mid x)$: the gap
# $\log p(x) - \mathrm{ELBO} = \mathrm{KL}(q\Vert p(z\mid x))$ is averaged over the data and
# mixed with everything else the ELBO measures. Three diagnostics of `pyrovae.diagnostics` look
# at $q$ directly, per datapoint (see [Diagnostics](../../../diagnostics/)):
#
# - **PSIS $\hat k$** (`psis_khat`): the tail shape of the importance weights $p(x,z)/q(z\mid x)$;
#   $\hat k > 0.7$ means $q$ misses posterior mass (usually: too narrow).
# - **NUTS** (`nuts_posterior`, `compare_posteriors`): exact posterior draws for a few points, to
#   compare means and standard deviations with $q$'s.
# - **The amortization gap** (`amortization_gap`): how much ELBO the encoder loses against the
#   best member $q^*$ of its family fitted to each point alone.
#
# We train a small VAE on digits, read the three together, then break $q$ on purpose (the same
# means, half the standard deviations) and see the ELBO barely move while $\hat k$ and NUTS
# object. Set `SMOKE = True` (or `PYROVAE_SMOKE=1`) for a run of under a minute.

# %% tags=["parameters"]
import os

SMOKE = os.environ.get("PYROVAE_SMOKE") == "1"

# %%
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from IPython.display import Image

import pyrovae
from pyrovae import diagnostics as D
from pyrovae.evaluate import elbo

torch.set_num_threads(1)
OUT = Path(tempfile.mkdtemp())

# %% [markdown]
# ## A small VAE on digits

# %%
config = {
    "data": {"dataset": "digits", "limit": 256 if SMOKE else 1797},
    "model": {
        "latent_dim": 2,
        "encoder": {"kind": "mlp", "hidden": [32 if SMOKE else 128]},
        "decoder": {"kind": "mlp", "hidden": [32 if SMOKE else 128]},
    },
    "train": {"epochs": 5 if SMOKE else 100, "batch_size": 64, "seed": 0, "device": "cpu"},
}
run = pyrovae.fit(config, OUT / "run", progress=False, figures=False)
vae = run.model.eval()
for p in vae.parameters():
    p.requires_grad_(False)
x = run.data.x_test[: 64 if SMOKE else 300]
print(f"{len(x)} test images, latent dimension {vae.config.latent_dim}")

# %% [markdown]
# ## The trained guide, and a broken one
#
# `narrow_guide` is the encoder's $q(z\mid x)=\mathcal N(\mu_\phi(x), \sigma_\phi(x)^2)$ with every
# standard deviation multiplied by `SHRINK`. It is what a KL$(q\Vert p)$-fitted posterior
# tends to look like when the family is wrong: too confident.

# %%
SHRINK = 0.5


def narrow_guide(x, n_data=None, beta=1.0):
    loc, scale = vae.posterior.encode(x)
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("z", dist.Normal(loc, SHRINK * scale).to_event(1))


guides = {"trained q": vae.guide, f"q with sd x {SHRINK}": narrow_guide}
S = 200 if SMOKE else 1000
pyro.set_rng_seed(0)
khats = {}
for name, guide in guides.items():
    e = elbo(vae.model, guide, x, S)
    khats[name] = k = D.psis_khat(vae.model, guide, x, num_samples=S)
    print(
        f"{name:>16}: ELBO {float(e.mean()):8.2f} nats/image, k-hat median {float(k.median()):.2f}, "
        f"share > 0.7: {float((k > 0.7).double().mean()):.0%}"
    )

# %% [markdown]
# The ELBOs differ by about one nat per image (halving two standard deviations costs
# $2\log 2 \approx 1.4$ nats of entropy, partly repaid by a better expected log-likelihood):
# on a training curve that is the size of what another seed or a few more epochs change. The $\hat k$ values are not: the
# importance weights of the narrow $q$ are heavy-tailed for most images, so any
# importance-sampled quantity (the IWAE $\log p(x)$, posterior expectations) is unreliable.

# %% [markdown]
# ## NUTS: the exact posterior for a few points
#
# NUTS samples $p(z\mid x_n)$ for a handful of images. `compare_posteriors` reports R-hat and
# ESS (did NUTS converge?) and, per point and latent dimension, the ratio
# $\mathrm{sd}_q/\mathrm{sd}_\text{NUTS}$ ($<1$: $q$ too narrow).

# %%
points = [0, 1, 2] if SMOKE else [0, 1, 2, 3, 4, 5]
nuts = D.nuts_posterior(
    vae.model,
    x[points],
    num_samples=60 if SMOKE else 300,
    warmup_steps=60 if SMOKE else 300,
    num_chains=2 if SMOKE else 4,
)
compare = {}
for name, guide in guides.items():
    idata = D.to_inference_data(guide, x[points], num_samples=500, mcmc_draws=nuts.z, point_ids=points)
    compare[name] = c = D.compare_posteriors(idata)
    print(
        f"{name:>16}: max R-hat {c['max_rhat']:.2f}, min ESS {c['min_ess']:.0f}, "
        f"mean sd_q/sd_NUTS {c['mean_sd_ratio']:.2f}, "
        f"mean |mean_q - mean_NUTS|/sd_NUTS {c['mean_abs_std_mean_diff']:.2f}"
    )
print(f"NUTS: {nuts.divergences} divergences, {nuts.seconds:.1f} s")

# %% [markdown]
# ## The amortization gap
#
# The inference gap $\log p(x) - \mathrm{ELBO}(q)$ splits into the *approximation gap* (what the
# best Gaussian $q^*$ per point still misses) and the *amortization gap* (what the shared
# encoder loses against $q^*$). For the narrow guide, fitting $q^*$ per point repairs the
# standard deviations, so the damage shows up as amortization gap.

# %%
n_gap = 16 if SMOKE else 100
gaps = {
    name: D.amortization_gap(
        vae.model,
        guide,
        x[:n_gap],
        steps=60 if SMOKE else 300,
        num_particles=8 if SMOKE else 32,
        eval_particles=200 if SMOKE else 1000,
        iwae_samples=200 if SMOKE else 1000,
    )
    for name, guide in guides.items()
}
for name, g in gaps.items():
    d = g.to_dict()
    print(
        f"{name:>16}: log p(x) {d['log_px']:8.2f}, ELBO(q) {d['elbo_q']:8.2f}, "
        f"ELBO(q*) {d['elbo_qstar']:8.2f}; approximation gap {d['approximation_gap']:.2f}, "
        f"amortization gap {d['amortization_gap']:.2f} nats"
    )

# %% [markdown]
# ## All three, side by side

# %%
fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
bins = np.linspace(-0.5, 1.5, 41)
for name, k in khats.items():
    axes[0].hist(k.numpy(), bins=bins, alpha=0.6, label=name)
axes[0].axvline(0.7, color="k", ls="--", lw=1)
axes[0].set(xlabel="PSIS k-hat per image", ylabel="images", title="importance weights")
axes[0].legend(fontsize=8)
for name, c in compare.items():
    axes[1].scatter(np.ravel(c["nuts_sd"]), np.ravel(c["q_sd"]), label=name)
lim = max(max(np.ravel(c["nuts_sd"]).max(), np.ravel(c["q_sd"]).max()) for c in compare.values())
axes[1].plot([0, lim], [0, lim], "k--", lw=1)
axes[1].set(xlabel="sd of p(z|x) (NUTS)", ylabel="sd of q(z|x)", title="NUTS vs q, per point and dim")
axes[1].legend(fontsize=8)
names = list(gaps)
approx = [float(gaps[n].approximation_gap.mean()) for n in names]
amort = [float(gaps[n].amortization_gap.mean()) for n in names]
axes[2].bar(names, approx, label="approximation gap")
axes[2].bar(names, amort, bottom=approx, label="amortization gap")
axes[2].set(ylabel="nats per image", title="log p(x) - ELBO(q)")
axes[2].legend(fontsize=8)
fig.tight_layout()
fig.savefig(OUT / "lesson9.png", dpi=100)
plt.close(fig)
Image(filename=str(OUT / "lesson9.png"))

# %% [markdown]
# Read together: the trained $q$ has mostly small $\hat k$, standard deviations near NUTS's and a
# small amortization gap; the narrow $q$ has an ELBO within about a nat of it, but $\hat k$ above
# 0.7 for many images, standard deviations well below NUTS's, and a larger inference gap, which
# the per-point fit $q^*$ mostly removes (it is amortization gap, not approximation gap). Each
# diagnostic is cheap to misread alone ($\hat k$ is noisy with few samples, NUTS sees only a few
# points, the gaps are averages); when they agree, believe them. `pyrovae diagnose RUN` runs all
# of them on a run folder and writes the verdicts.

# %% [markdown]
# ## Exercises
#
# Replace each `raise NotImplementedError` by your code and run the cell: `check` tests your
# function on random inputs against an independent computation.
# `pyrovae.teaching.solutions` holds reference answers.

# %%
from pyrovae.teaching.solutions import check

# %% [markdown]
# ### 9.1 The entropy a narrower $q$ gives up
#
# Multiplying every standard deviation of a diagonal Gaussian $q$ in $d$ dimensions by $s$
# changes its entropy by $d\log s$, whatever the means and scales. Return the entropy of
# $\mathcal N(\mu, \operatorname{diag}\sigma^2)$ per row (`sigma` is `(N, d)`), in nats.


# %%
def diagonal_gaussian_entropy(sigma):
    """Entropy per row of N(mu, diag(sigma^2)), shape (N,)."""
    raise NotImplementedError  # your code here


check("9.1", diagonal_gaussian_entropy)

# %% [markdown]
# ### 9.2 Self-normalized importance weights
#
# PSIS smooths the largest of the normalized weights $\bar w_s = w_s/\sum_t w_t$. From log-weights
# `logw` (`(N, S)`, one row per datapoint) return the largest normalized weight per row,
# $\max_s \bar w_s$, without overflow. A value near 1 means one draw carries the whole estimate.


# %%
def max_normalized_weight(logw):
    """max_s w_s / sum_t w_t per row, shape (N,)."""
    raise NotImplementedError  # your code here


check("9.2", max_normalized_weight)
