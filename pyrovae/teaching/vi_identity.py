r"""Lesson 6 — the variational-inference identity, checked on probabilistic PCA.

For any distribution $q(z)$ over the latent code of a datapoint $x$,

$$\log p(x) = \underbrace{\mathbb E_{q}\Big[\log \frac{p(x, z)}{q(z)}\Big]}_{\mathrm{ELBO}(q)}
 + \underbrace{\mathbb E_{q}\Big[\log \frac{q(z)}{p(z\mid x)}\Big]}_{\mathrm{KL}(q\,\|\,p(z\mid x))\;\ge\;0}$$

(write $p(x, z) = p(z\mid x)\,p(x)$ inside the first expectation). Because $\log p(x)$ does not
depend on $q$, **maximising the ELBO over $q$ is the same as minimising
$\mathrm{KL}(q\,\|\,p(z\mid x))$**, and the ELBO equals $\log p(x)$ exactly when $q$ is the
posterior. On pPCA all three terms are closed-form ([`pyrovae.teaching.ppca`][pyrovae.teaching.ppca]), so the
identity can be verified to machine precision and SVI can be watched driving the KL to 0.

References:
    M. I. Jordan, Z. Ghahramani, T. S. Jaakkola, L. K. Saul (1999), *An introduction to
    variational methods for graphical models*, Machine Learning 37.
    D. M. Blei, A. Kucukelbir, J. D. McAuliffe (2017), *Variational inference: a review for
    statisticians*, JASA 112, eq. (13).
    D. P. Kingma, M. Welling (2014), *Auto-encoding variational Bayes*, ICLR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import ClippedAdam
from torch import Tensor

from pyrovae.errors import ConfigError
from pyrovae.teaching.ppca import (
    DTYPE,
    PPCA,
    Guide,
    elbo_closed_form,
    exact_guide,
    exact_kl_to_posterior,
    fixed_gaussian_guide,
    learnable_gaussian_guide,
    perturbed_posterior,
)

__all__ = [
    "IdentityCheck",
    "MCCheck",
    "SVIRun",
    "VIIdentityResult",
    "exact_guide_trace_elbo_gap",
    "identity_check",
    "mc_elbo",
    "optimize_linear_guide",
    "plot_vi_identity",
    "random_gaussian_q",
    "vi_identity_lesson",
]


def random_gaussian_q(
    ppca: PPCA, x: Tensor, generator: torch.Generator, spread: float = 1.0
) -> tuple[Tensor, Tensor]:
    r"""A random Gaussian $q(z\mid x_n) = \mathcal N(m_n, S_n)$ per datapoint.

    $m_n = m^{\text{exact}}_n + \varepsilon_n$ with $\varepsilon_n \sim \mathcal N(0, s^2 I)$,
    $s$ = `spread` $\times\, e^{u}$, $u \sim \mathcal N(0, 1)$; $S_n = L_n L_n^\top$ with
    $L_n$ lower-triangular, off-diagonal $\mathcal N(0, 0.3^2)$ and diagonal
    $e^{v}\sqrt{\operatorname{diag}\Sigma^{\text{exact}}}$, $v \sim \mathcal N(0, 0.5^2)$.

    Returns:
        `(mean [N, k], cov [N, k, k])`.
    """
    post_mean, post_cov = ppca.posterior(x)
    n, k = post_mean.shape
    s = spread * math.exp(float(torch.randn((), generator=generator, dtype=DTYPE)))
    mean = post_mean + s * torch.randn(n, k, generator=generator, dtype=DTYPE)
    L = 0.3 * torch.randn(n, k, k, generator=generator, dtype=DTYPE).tril(-1)
    diag = torch.exp(0.5 * torch.randn(n, k, generator=generator, dtype=DTYPE))
    L = L * post_cov.diagonal().sqrt() + torch.diag_embed(diag * post_cov.diagonal().sqrt())
    return mean, L @ L.transpose(-1, -2)


@dataclass(frozen=True)
class IdentityCheck:
    """$\\log p(x) = \\mathrm{ELBO}(q) + \\mathrm{KL}(q\\|p(z\\mid x))$ over many random $q$."""

    n_q: int
    """Number of random Gaussian q (each with its own mean and covariance per datapoint)."""
    n_data: int
    """Datapoints per q."""
    max_abs_gap: float
    """max |log p(x) − ELBO(q) − KL(q‖p(z|x))| over all q and datapoints (nats)."""
    min_kl: float
    """Smallest KL(q‖p(z|x)) seen (>= 0)."""
    max_elbo_minus_logpx: float
    """Largest ELBO(q) − log p(x) seen (<= 0: the ELBO is a lower bound)."""
    kl_range: tuple[float, float]
    """(min, max) of the per-q mean KL, to show the q's were far apart."""


def identity_check(ppca: PPCA, x: Tensor, n_q: int = 100, seed: int = 0) -> IdentityCheck:
    """Check the VI identity for `n_q` random Gaussian $q$ in float64.

    Args:
        ppca: the model.
        x: `[N, D]` data.
        n_q: number of random q (see [`random_gaussian_q`][pyrovae.teaching.vi_identity.random_gaussian_q]).
        seed: seed of a private generator.
    """
    if n_q < 1:
        raise ConfigError(f"n_q: expected >= 1, got {n_q}")
    gen = torch.Generator().manual_seed(seed)
    log_px = ppca.log_marginal(x)
    gaps, kls, excess, kl_means = [], [], [], []
    for _ in range(n_q):
        mean, cov = random_gaussian_q(ppca, x, gen)
        elbo = elbo_closed_form(mean, cov, ppca, x)
        kl = exact_kl_to_posterior(mean, cov, ppca, x)
        gaps.append((log_px - elbo - kl).abs().max())
        kls.append(kl.min())
        excess.append((elbo - log_px).max())
        kl_means.append(float(kl.mean()))
    return IdentityCheck(
        n_q=n_q,
        n_data=x.shape[0],
        max_abs_gap=float(torch.stack(gaps).max()),
        min_kl=float(torch.stack(kls).min()),
        max_elbo_minus_logpx=float(torch.stack(excess).max()),
        kl_range=(min(kl_means), max(kl_means)),
    )


def mc_elbo(
    ppca: PPCA,
    guide: Guide,
    x: Tensor,
    num_particles: int = 64,
    repeats: int = 20,
    seed: int = 0,
) -> tuple[float, float]:
    r"""Monte Carlo ELBO per datapoint from Pyro's `Trace_ELBO`, with its standard error.

    `Trace_ELBO(num_particles=P).loss(model, guide, x)` estimates
    $-\sum_n \mathrm{ELBO}_n$; dividing by $N$ gives nats per datapoint. The estimate is
    repeated `repeats` times (independent draws) to get a standard error. The global torch RNG
    is forked, so the caller's random state is unchanged.

    Returns:
        `(mean ELBO per datapoint, standard error)`.
    """
    if num_particles < 1 or repeats < 2:
        raise ConfigError(
            f"num_particles >= 1 and repeats >= 2 required, got {num_particles}, {repeats}"
        )
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    n = x.shape[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        values = np.array([-elbo.loss(ppca.model, guide, x) / n for _ in range(repeats)])
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(repeats))


@dataclass(frozen=True)
class MCCheck:
    """Pyro `Trace_ELBO` (Monte Carlo) vs the closed-form ELBO, for several q."""

    closed_form: np.ndarray
    """Closed-form mean ELBO per datapoint, one per q."""
    monte_carlo: np.ndarray
    """Trace_ELBO estimate of the same."""
    stderr: np.ndarray
    """Its standard error."""
    num_particles: int
    """Particles per Trace_ELBO call."""
    repeats: int
    """Trace_ELBO calls per q."""

    @property
    def max_abs_z(self) -> float:
        """Largest |MC − closed form| / standard error."""
        return float(np.abs((self.monte_carlo - self.closed_form) / self.stderr).max())


def exact_guide_trace_elbo_gap(ppca: PPCA, x: Tensor) -> float:
    r"""max over datapoints of $|\text{Trace\_ELBO loss}(x_n) + \log p(x_n)|$ with the exact guide.

    With $q = p(z\mid x)$, $\log p(x,z) - \log q(z\mid x) = \log p(x)$ for every $z$, so a single
    particle already gives $-\log p(x_n)$ exactly (a zero-variance estimator).
    """
    log_px = ppca.log_marginal(x)
    guide = exact_guide(ppca)
    elbo = Trace_ELBO(num_particles=1, max_plate_nesting=1)
    losses = torch.tensor(
        [elbo.loss(ppca.model, guide, x[i : i + 1]) for i in range(x.shape[0])], dtype=DTYPE
    )
    return float((losses + log_px).abs().max())


@dataclass(frozen=True)
class SVIRun:
    """Per-step trace of SVI on the linear-Gaussian amortized guide (nats per datapoint).

    Entry `t` of each per-step array is evaluated at the parameters that step `t` used
    (before its update), so the Monte Carlo and closed-form values are comparable.
    """

    elbo_mc: np.ndarray
    """`-loss / N` returned by `svi.step` (a Monte Carlo ELBO estimate)."""
    elbo_exact: np.ndarray
    """Closed-form mean ELBO of the guide at each step."""
    kl_exact: np.ndarray
    """Mean exact KL(q(z|x) ‖ p(z|x)) at each step."""
    log_px: float
    """Mean log p(x) (the ceiling of the ELBO)."""
    elbo_final: float
    """Closed-form mean ELBO after the last update."""
    kl_final: float
    """Mean exact KL after the last update."""

    @property
    def kl_initial(self) -> float:
        """Mean KL before the first update."""
        return float(self.kl_exact[0])


def optimize_linear_guide(
    ppca: PPCA,
    x: Tensor,
    steps: int = 600,
    lr: float = 0.05,
    num_particles: int = 8,
    seed: int = 0,
) -> SVIRun:
    r"""Maximise the ELBO over $(A, b, L)$ of $q(z\mid x) = \mathcal N(xA + b, LL^\top)$ with Pyro SVI.

    `SVI(model, learnable_gaussian_guide, ClippedAdam, Trace_ELBO)` in float64, starting at
    $q = p(z)$; the learning rate decays geometrically to 1% of `lr` by the last step, which
    damps the Monte Carlo noise at the end. Runs in a fresh param-store scope and a forked RNG,
    so the caller's params and random state are untouched.

    Args:
        ppca: the model.
        x: `[N, D]` data.
        steps: SVI steps (full batch).
        lr: initial learning rate.
        num_particles: vectorized particles per step.
        seed: torch seed for the run.
    """
    if steps < 1:
        raise ConfigError(f"steps: expected >= 1, got {steps}")
    x = ppca.check_x(x)
    n = x.shape[0]
    guide = learnable_gaussian_guide(ppca.D, ppca.k)
    loss = Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    optim = ClippedAdam({"lr": lr, "lrd": 0.01 ** (1.0 / steps)})
    log_px = float(ppca.log_marginal(x).mean())

    def current() -> tuple[float, float]:
        A, b = pyro.param("q_A").detach(), pyro.param("q_b").detach()
        L = pyro.param("q_scale_tril").detach()
        mean, cov = x @ A + b, L @ L.T
        return (
            float(elbo_closed_form(mean, cov, ppca, x).mean()),
            float(exact_kl_to_posterior(mean, cov, ppca, x).mean()),
        )

    elbo_mc, elbo_exact, kl_exact = [], [], []
    with pyro.get_param_store().scope(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        guide(x)  # register the params at their initial values
        svi = SVI(ppca.model, guide, optim, loss)
        for _ in range(steps):
            e, kl = current()
            elbo_exact.append(e)
            kl_exact.append(kl)
            elbo_mc.append(-svi.step(x) / n)
        elbo_final, kl_final = current()
    return SVIRun(
        elbo_mc=np.array(elbo_mc),
        elbo_exact=np.array(elbo_exact),
        kl_exact=np.array(kl_exact),
        log_px=log_px,
        elbo_final=elbo_final,
        kl_final=kl_final,
    )


@dataclass(frozen=True)
class VIIdentityResult:
    """Numbers of lesson 6 (nats per datapoint)."""

    D: int
    """Data dimension."""
    k: int
    """Latent dimension."""
    sigma: float
    """Noise standard deviation."""
    n_data: int
    """Number of datapoints."""
    log_px: float
    """Mean log p(x)."""
    identity: IdentityCheck
    """The identity over many random q."""
    exact_elbo_gap: float
    """max |closed-form ELBO(exact posterior) − log p(x)|."""
    exact_trace_elbo_gap: float
    """max |Trace_ELBO loss − (−log p(x))| per datapoint, exact guide, one particle."""
    mc: MCCheck
    """Trace_ELBO vs closed form for several q."""
    svi: SVIRun
    """SVI on the linear-Gaussian guide."""


def vi_identity_lesson(
    D: int = 10,
    k: int = 3,
    sigma: float = 0.5,
    n_data: int = 200,
    n_q: int = 100,
    steps: int = 600,
    seed: int = 0,
) -> VIIdentityResult:
    """Compute every number of lesson 6.

    Args:
        D: data dimension.
        k: latent dimension.
        sigma: noise standard deviation.
        n_data: datapoints sampled from the model.
        n_q: random q for the identity check.
        steps: SVI steps.
        seed: seed of everything.
    """
    ppca = PPCA.random(D, k, sigma, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = ppca.sample(n_data, gen)
    log_px = ppca.log_marginal(x)
    post_mean, post_cov = ppca.posterior(x)

    qs = [random_gaussian_q(ppca, x, gen, spread=0.3) for _ in range(4)]
    qs += [perturbed_posterior(ppca, x, 0.2, 1.5), perturbed_posterior(ppca, x, 0.0, 0.7)]
    closed, mcs, ses = [], [], []
    num_particles, repeats = 32, 20
    for i, (mean, cov) in enumerate(qs):
        closed.append(float(elbo_closed_form(mean, cov, ppca, x).mean()))
        m, s = mc_elbo(
            ppca, fixed_gaussian_guide(mean, cov), x, num_particles, repeats, seed=seed + i
        )
        mcs.append(m)
        ses.append(s)
    return VIIdentityResult(
        D=D,
        k=k,
        sigma=sigma,
        n_data=n_data,
        log_px=float(log_px.mean()),
        identity=identity_check(ppca, x, n_q=n_q, seed=seed),
        exact_elbo_gap=float((elbo_closed_form(post_mean, post_cov, ppca, x) - log_px).abs().max()),
        exact_trace_elbo_gap=exact_guide_trace_elbo_gap(ppca, x[:20]),
        mc=MCCheck(
            closed_form=np.array(closed),
            monte_carlo=np.array(mcs),
            stderr=np.array(ses),
            num_particles=num_particles,
            repeats=repeats,
        ),
        svi=optimize_linear_guide(ppca, x, steps=steps, seed=seed),
    )


def plot_vi_identity(result: VIIdentityResult, path: str | Path) -> Path:
    r"""Figure of lesson 6: SVI drives $\mathrm{KL}(q\|p(z\mid x)) \to 0$ and the ELBO $\to \log p(x)$.

    Left: mean ELBO per datapoint (Monte Carlo from `svi.step` and closed form) against the
    constant $\log p(x)$. Right: mean exact KL on a log scale; at every step
    $\mathrm{ELBO} + \mathrm{KL} = \log p(x)$.

    Args:
        result: output of [`vi_identity_lesson`][pyrovae.teaching.vi_identity.vi_identity_lesson].
        path: where to write the image.
    """
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    run = result.svi
    steps = np.arange(1, len(run.kl_exact) + 1)
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(
        steps,
        run.elbo_mc,
        color="tab:blue",
        lw=0.8,
        alpha=0.6,
        label="ELBO, Monte Carlo (svi.step)",
    )
    ax1.plot(steps, run.elbo_exact, color="tab:orange", ls="--", lw=1.2, label="ELBO, closed form")
    ax1.axhline(run.log_px, color="k", ls=":", lw=1, label=r"$\log p(x)$")
    span = run.log_px - min(run.elbo_exact.min(), run.elbo_mc.min())
    ax1.set_ylim(run.log_px - 1.05 * span, run.log_px + 0.1 * span)
    ax1.set_xscale("log")
    ax1.set_xlabel("SVI step")
    ax1.set_ylabel("nats per datapoint")
    ax1.set_title("ELBO rises to log p(x)")
    ax1.legend(loc="lower right")
    ax2.semilogy(steps, run.kl_exact, label=r"KL$(q(z|x)\,\|\,p(z|x))$, exact")
    ax2.semilogy(steps, run.log_px - run.elbo_exact, ":", label=r"$\log p(x) - $ELBO")
    ax2.set_xscale("log")
    ax2.set_xlabel("SVI step")
    ax2.set_ylabel("nats per datapoint")
    ax2.set_title("KL to the true posterior falls to ~0")
    ax2.legend()
    fig.savefig(path, dpi=110)
    return path
