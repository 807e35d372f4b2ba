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
# # Lesson 8 notebook: summing out a discrete variable
#
# A mixture model has a discrete latent variable: the component $c_n \in \{0,\dots,K-1\}$ that
# generated datapoint $x_n$. A discrete variable cannot be reparameterized, so a sampled $c$
# gives the ELBO gradient through the *score-function* (REINFORCE) estimator,
# $\nabla_\phi \mathbb E_q[f(c)] = \mathbb E_q[f(c)\,\nabla_\phi \log q_\phi(c)]$, which is unbiased
# but noisy. When $K$ is small we can instead *sum $c$ out*:
# $\mathbb E_{q(c\mid x)}[f(c)] = \sum_{k} q(k\mid x) f(k)$, exactly. Pyro does this with
# `TraceEnum_ELBO` and `infer={"enumerate": "parallel"}` on the site: it evaluates all $K$
# values at once in a new tensor dimension left of the plates.
#
# This notebook measures both gradients at the same fixed parameters, many times over: their
# means agree, their variances do not, and enumeration costs about $K$ times the work per
# gradient. Set `SMOKE = True` (or `PYROVAE_SMOKE=1`) for a smaller run of a few seconds.

# %% tags=["parameters"]
import os

SMOKE = os.environ.get("PYROVAE_SMOKE") == "1"

# %%
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from IPython.display import Image
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

torch.set_num_threads(1)  # tiny tensors: threads only add overhead
OUT = Path(tempfile.mkdtemp())
K, N = 3, (60 if SMOKE else 300)
REPEATS = 200 if SMOKE else 1000
SIGMA = 0.5

# %% [markdown]
# ## The model and the guide
#
# Three components on a line, a shared global shift $s$ (a continuous latent, so that the
# enumerated gradient is still a Monte Carlo estimate, only a much better one) and a discrete
# assignment $c_n$ per point:
#
# $$ s \sim \mathcal N(0, 1),\quad c_n \sim \mathrm{Cat}(\tfrac1K,\dots,\tfrac1K),\quad
#    x_n \mid c_n, s \sim \mathcal N(\mu_{c_n} + s, \sigma^2). $$
#
# The guide is $q(s) = \mathcal N(m, v^2)$ and a tiny amortized
# $q(c_n \mid x_n) = \mathrm{Cat}(\mathrm{softmax}(w x_n + b))$. The only difference between the
# two estimators is the `infer` annotation of the guide's `c` site.

# %%
torch.manual_seed(0)
true_locs = torch.tensor([-2.0, 0.0, 2.5])
x = true_locs[torch.randint(K, (N,))] + SIGMA * torch.randn(N)


def model(x):
    locs = pyro.param("locs", torch.tensor([-1.0, 0.5, 1.5]))
    s = pyro.sample("s", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        c = pyro.sample("c", dist.Categorical(logits=torch.zeros(K)))
        pyro.sample("x", dist.Normal(locs[c] + s, SIGMA), obs=x)


def make_guide(enumerate_c: bool):
    def guide(x):
        m = pyro.param("m", torch.tensor(0.1))
        v = pyro.param("v", torch.tensor(0.05), constraint=dist.constraints.positive)
        w = pyro.param("w", torch.tensor([-1.0, 0.0, 1.0]))
        b = pyro.param("b", torch.zeros(K))
        pyro.sample("s", dist.Normal(m, v))
        with pyro.plate("data", len(x)):
            infer = {"enumerate": "parallel"} if enumerate_c else {}
            pyro.sample("c", dist.Categorical(logits=x[:, None] * w + b), infer=infer)

    return guide


# %% [markdown]
# ## Many gradients at one fixed point
#
# Both objectives are differentiated at the same parameter values (the initial ones above),
# `REPEATS` times each. `differentiable_loss` returns a surrogate whose gradient is the
# estimator: for `Trace_ELBO` it contains the score-function term for the sampled `c`.

# %%
PARAMS = ["locs", "m", "v", "w", "b"]


def gradients(elbo, guide, repeats):
    pyro.clear_param_store()
    guide(x), model(x)  # create the parameters at their initial values
    params = [pyro.param(name).unconstrained() for name in PARAMS]
    grads, t0 = [], time.perf_counter()
    for _ in range(repeats):
        loss = elbo.differentiable_loss(model, guide, x)
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(grads), (time.perf_counter() - t0) / repeats


pyro.set_rng_seed(1)
g_enum, t_enum = gradients(TraceEnum_ELBO(max_plate_nesting=1), make_guide(True), REPEATS)
g_samp, t_samp = gradients(Trace_ELBO(), make_guide(False), REPEATS)
names = ["locs[0]", "locs[1]", "locs[2]", "m", "v", "w[0]", "w[1]", "w[2]", "b[0]", "b[1]", "b[2]"]

print(f"{'parameter':>9} {'enumerated':>20} {'sampled c':>20} {'|diff|/SE':>9} {'var ratio':>10}")
for i, name in enumerate(names):
    me, ms = g_enum[:, i].mean(), g_samp[:, i].mean()
    se = (g_enum[:, i].var() / REPEATS + g_samp[:, i].var() / REPEATS).sqrt()
    ratio = g_samp[:, i].var() / g_enum[:, i].var().clamp(min=1e-12)
    print(
        f"{name:>9} {me:10.3f} ± {g_enum[:, i].std() / REPEATS**0.5:7.3f} "
        f"{ms:10.3f} ± {g_samp[:, i].std() / REPEATS**0.5:7.3f} {abs(me - ms) / se:9.2f} {ratio:10.0f}"
    )
print(f"time per gradient: enumerated {1e3 * t_enum:.2f} ms, sampled {1e3 * t_samp:.2f} ms "
      f"({t_enum / t_samp:.1f}x)")

# %% [markdown]
# Read the table column by column. The means agree: `|diff|/SE` (the difference of the two means
# in units of its standard error) is of order one, as it should be for two unbiased estimators
# of the same gradient. The variances do not: for the guide's parameters of $q(c\mid x)$ ($w$,
# $b$), whose gradient *only* the score function carries when $c$ is sampled, the sampled-$c$
# variance is orders of magnitude larger; for the model's `locs` and for $q(s)$ it is larger
# too, because one sampled $c$ per point is noisier than the exact sum. The last line is the
# price: $K$ evaluations of the likelihood per point instead of one, in a tensor $K$ times
# larger. On tensors this small Pyro's per-call overhead dominates, so the time grows by much
# less than $K$; with several enumerated sites the cost is the product of their sizes (or
# exponential in their number), which is when sampling (with a baseline) is used instead.

# %%
i = names.index("b[0]")
fig, ax = plt.subplots(figsize=(6, 3.2))
bins = np.linspace(float(g_samp[:, i].min()), float(g_samp[:, i].max()), 50)
ax.hist(g_samp[:, i].numpy(), bins=bins, alpha=0.6, label="sampled c (Trace_ELBO)")
ax.hist(g_enum[:, i].numpy(), bins=bins, alpha=0.8, label="c enumerated (TraceEnum_ELBO)")
ax.axvline(float(g_enum[:, i].mean()), color="k", lw=1, ls="--", label="enumerated mean")
ax.set_xlabel("d(-ELBO)/d b[0]")
ax.set_ylabel(f"count of {REPEATS}")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(OUT / "lesson8.png", dpi=100)
plt.close(fig)
Image(filename=str(OUT / "lesson8.png"))

# %% [markdown]
# ## Exercises
#
# Replace each `raise NotImplementedError` by your code and run the cell: `check` tests your
# function on random inputs against an independent computation (here: Pyro's own
# `TraceEnum_ELBO`, and autograd). `pyrovae.teaching.solutions` holds reference answers.

# %%
from pyrovae.teaching.solutions import check

# %% [markdown]
# ### 8.1 The ELBO with $c$ summed out, by hand
#
# With no other latent variable, the ELBO of a mixture is a finite sum. Given the prior's
# log-probabilities `log_prior[k]` $=\log p(c=k)$, the log-likelihoods `log_lik[n, k]`
# $=\log p(x_n\mid c_n=k)$ and the guide's logits `q_logits[n, k]`, return
# $\sum_n \sum_k q(k\mid x_n)\,\big[\log p(c=k) + \log p(x_n\mid k) - \log q(k\mid x_n)\big]$.
# The check compares it with `-TraceEnum_ELBO(max_plate_nesting=1).loss(...)`.


# %%
def enumerated_elbo(log_prior, log_lik, q_logits):
    """The exact ELBO, summed over the N points."""
    raise NotImplementedError  # your code here


check("8.1", enumerated_elbo)

# %% [markdown]
# ### 8.2 The score-function gradient, exactly
#
# For $q_\theta(c) = \mathrm{Cat}(\mathrm{softmax}(\theta))$ and fixed values `f[k]`
# $= f(k)$, the score-function estimator $f(c)\,\nabla_\theta \log q_\theta(c)$ with $c\sim q$
# is unbiased. Return its expectation $\sum_k q_k\, f(k)\, \nabla_\theta \log q_k$ (a vector of
# length $K$) in closed form. The check compares it with autograd of
# $\sum_k \mathrm{softmax}(\theta)_k f(k)$.


# %%
def score_function_gradient(logits, f):
    """E_q[f(c) d/dtheta log q(c)], shape (K,)."""
    raise NotImplementedError  # your code here


check("8.2", score_function_gradient)
