r"""Lesson 4 — information, entropy and the Kullback–Leibler divergence.

* Information (surprise) of an event of probability $p$: $I = -\log p$
  (nats with $\ln$, bits with $\log_2$).
* Entropy, the expected information: $H(p) = -\sum_i p_i \log p_i$ (with $0 \log 0 = 0$).
* KL divergence: $\mathrm{KL}(p \,\|\, q) = \sum_i p_i \log \frac{p_i}{q_i}
  = -\sum_i p_i \log \frac{q_i}{p_i}$, the expected extra information paid for coding
  samples of $p$ with a code built for $q$.
* Gibbs' inequality: $\mathrm{KL}(p \,\|\, q) \ge 0$ with equality iff $p = q$ (from Jensen,
  $-\sum p \log(q/p) \ge -\log \sum p \cdot q/p = 0$). It is **not** symmetric.
* Gaussians, closed form:
  $\mathrm{KL}(\mathcal N(\mu_1, \sigma_1^2) \,\|\, \mathcal N(\mu_2, \sigma_2^2))
  = \log\frac{\sigma_2}{\sigma_1} + \frac{\sigma_1^2 + (\mu_1-\mu_2)^2}{2\sigma_2^2} - \frac12$,
  summed over coordinates for diagonal covariances.
* Monte Carlo: $\widehat{\mathrm{KL}}_n = \frac1n \sum_{s=1}^{n} [\log p(x_s) - \log q(x_s)]$,
  $x_s \sim p$, is unbiased with standard error $\mathrm{sd}/\sqrt n$.

References:
    C. E. Shannon (1948), *A mathematical theory of communication*.
    S. Kullback, R. A. Leibler (1951), *On information and sufficiency*, Ann. Math. Stat. 22.
    T. M. Cover, J. A. Thomas (2006), *Elements of Information Theory*, 2nd ed., §2.3, §2.6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Categorical, Dirichlet, Independent, Normal, kl_divergence

from pyrovae.errors import ConfigError, DataError

__all__ = [
    "GibbsCheck",
    "InformationResult",
    "MCConvergence",
    "diag_gaussian_kl",
    "entropy",
    "gaussian_kl",
    "gibbs_check",
    "information",
    "information_lesson",
    "kl_discrete",
    "mc_gaussian_kl",
    "mc_convergence",
    "plot_information",
]

_DT = torch.float64


def _log_base(base: float) -> float:
    if not (base > 0 and base != 1 and math.isfinite(base)):
        raise ConfigError(f"base: expected a finite positive number other than 1, got {base}")
    return math.log(base)


def _probs(p: Tensor | list[float] | tuple[float, ...], name: str) -> Tensor:
    """Validate a probability vector (or a batch of them, last dim = outcomes)."""
    t = torch.as_tensor(p, dtype=_DT)
    if t.ndim == 0:
        raise DataError(f"{name}: expected a vector of probabilities, got a scalar")
    if not torch.isfinite(t).all() or (t < 0).any():
        raise DataError(f"{name}: probabilities must be finite and >= 0, got {t.tolist()}")
    sums = t.sum(-1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-9, rtol=0):
        raise DataError(f"{name}: probabilities must sum to 1, got sum {sums.tolist()}")
    return t


def information(p: float | Tensor, base: float = math.e) -> Tensor:
    r"""Information (surprise) of an event of probability $p$: $I(p) = -\log_b p$.

    Args:
        p: probability (or tensor of probabilities) in $(0, 1]$; $p = 0$ gives $+\infty$.
        base: $e$ for nats, 2 for bits.
    """
    t = torch.as_tensor(p, dtype=_DT)
    if not torch.isfinite(t).all() or (t < 0).any() or (t > 1).any():
        raise DataError(f"p: expected probabilities in [0, 1], got {t.tolist()}")
    return -torch.log(t) / _log_base(base)


def entropy(p: Tensor | list[float] | tuple[float, ...], base: float = math.e) -> Tensor:
    r"""Entropy $H(p) = -\sum_i p_i \log_b p_i$, the expected information (`0 log 0 = 0`).

    Uses `torch.special.entr` ($-x \ln x$, defined as 0 at 0).

    Args:
        p: probability vector `[K]` or batch `[..., K]`.
        base: $e$ for nats, 2 for bits.
    """
    return torch.special.entr(_probs(p, "p")).sum(-1) / _log_base(base)


def kl_discrete(
    p: Tensor | list[float] | tuple[float, ...],
    q: Tensor | list[float] | tuple[float, ...],
    base: float = math.e,
) -> Tensor:
    r"""Discrete KL divergence $\mathrm{KL}(p\|q) = \sum_i p_i \log_b \frac{p_i}{q_i}$.

    Terms with $p_i = 0$ contribute 0; $p_i > 0 = q_i$ gives $+\infty$ (`torch.special.xlogy`).

    Args:
        p: probability vector `[K]` (or batch `[..., K]`), the distribution of the data.
        q: probability vector of the same shape, the approximating distribution.
        base: $e$ for nats, 2 for bits.
    """
    pt, qt = _probs(p, "p"), _probs(q, "q")
    if pt.shape[-1] != qt.shape[-1]:
        raise DataError(f"q: expected {pt.shape[-1]} outcomes like p, got {qt.shape[-1]}")
    xlogy = torch.special.xlogy
    return (xlogy(pt, pt) - xlogy(pt, qt)).sum(-1) / _log_base(base)


def gaussian_kl(
    mu1: float | Tensor, sigma1: float | Tensor, mu2: float | Tensor, sigma2: float | Tensor
) -> Tensor:
    r"""$\mathrm{KL}(\mathcal N(\mu_1,\sigma_1^2)\|\mathcal N(\mu_2,\sigma_2^2))
    = \log\frac{\sigma_2}{\sigma_1} + \frac{\sigma_1^2 + (\mu_1-\mu_2)^2}{2\sigma_2^2} - \frac12$ (nats).

    Elementwise over broadcast tensors.

    Args:
        mu1: mean of the first Gaussian.
        sigma1: standard deviation ($> 0$) of the first Gaussian.
        mu2: mean of the second Gaussian.
        sigma2: standard deviation ($> 0$) of the second Gaussian.
    """
    mu1, s1, mu2, s2 = (torch.as_tensor(v, dtype=_DT) for v in (mu1, sigma1, mu2, sigma2))
    if (s1 <= 0).any() or (s2 <= 0).any():
        raise ConfigError("sigma1, sigma2: standard deviations must be > 0")
    return torch.log(s2 / s1) + (s1**2 + (mu1 - mu2) ** 2) / (2 * s2**2) - 0.5


def diag_gaussian_kl(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    r"""KL between diagonal Gaussians: the sum over coordinates of [`gaussian_kl`][pyrovae.teaching.information.gaussian_kl],

    $\mathrm{KL} = \sum_{i=1}^{d} \Big[\log\frac{\sigma_{2,i}}{\sigma_{1,i}}
    + \frac{\sigma_{1,i}^2 + (\mu_{1,i}-\mu_{2,i})^2}{2\sigma_{2,i}^2} - \frac12\Big]$.

    Args:
        mu1: `[..., d]` means of $q$.
        sigma1: `[..., d]` standard deviations of $q$.
        mu2: `[..., d]` means of $p$.
        sigma2: `[..., d]` standard deviations of $p$.
    """
    return gaussian_kl(mu1, sigma1, mu2, sigma2).sum(-1)


def mc_gaussian_kl(
    mu1: Tensor,
    sigma1: Tensor,
    mu2: Tensor,
    sigma2: Tensor,
    n: int,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    r"""Monte Carlo estimate of the diagonal-Gaussian KL, with its standard error.

    $\widehat{\mathrm{KL}}_n = \frac1n\sum_s w_s$, $w_s = \log p_1(x_s) - \log p_2(x_s)$,
    $x_s \sim p_1 = \mathcal N(\mu_1, \mathrm{diag}\,\sigma_1^2)$;
    standard error $\hat s_w / \sqrt n$.

    Args:
        mu1: `[d]` mean of the sampling distribution $p_1$.
        sigma1: `[d]` its standard deviations.
        mu2: `[d]` mean of $p_2$.
        sigma2: `[d]` its standard deviations.
        n: number of samples ($\ge 2$).
        generator: random generator.

    Returns:
        `(estimate, standard_error)` in nats.
    """
    if n < 2:
        raise ConfigError(f"n: expected >= 2 samples, got {n}")
    mu1, s1, mu2, s2 = (
        torch.atleast_1d(torch.as_tensor(v, dtype=_DT)) for v in (mu1, sigma1, mu2, sigma2)
    )
    if (s1 <= 0).any() or (s2 <= 0).any():
        raise ConfigError("sigma1, sigma2: standard deviations must be > 0")
    p1 = Independent(Normal(mu1, s1), 1)
    p2 = Independent(Normal(mu2, s2), 1)
    eps = torch.randn((n, *mu1.shape), generator=generator, dtype=_DT)
    x = mu1 + s1 * eps
    w = p1.log_prob(x) - p2.log_prob(x)
    return float(w.mean()), float(w.std(unbiased=True) / math.sqrt(n))


@dataclass(frozen=True)
class GibbsCheck:
    """Result of checking $\\mathrm{KL} \\ge 0$ on many random pairs of distributions."""

    n_pairs: int
    """How many random pairs (p, q) were drawn."""
    n_outcomes: int
    """Number of outcomes of each distribution."""
    min_kl: float
    """Smallest KL(p‖q) seen (nats); Gibbs: >= 0."""
    n_negative: int
    """How many pairs had KL < 0 (must be 0)."""
    max_abs_diff_torch: float
    """Largest |ours − torch.distributions.kl_divergence| over the pairs."""
    mean_abs_asymmetry: float
    """Mean |KL(p‖q) − KL(q‖p)| (nats): the divergence is not symmetric."""


def gibbs_check(n_pairs: int = 10_000, n_outcomes: int = 5, seed: int = 0) -> GibbsCheck:
    r"""Check Gibbs' inequality $\mathrm{KL}(p\|q) \ge 0$ on random pairs $p, q \sim \mathrm{Dir}(\mathbf 1)$.

    Also cross-checks [`kl_discrete`][pyrovae.teaching.information.kl_discrete] against
    `torch.distributions.kl_divergence(Categorical(p), Categorical(q))`.

    Args:
        n_pairs: number of random pairs.
        n_outcomes: number of outcomes $K \ge 2$.
        seed: random seed.
    """
    if n_pairs < 1:
        raise ConfigError(f"n_pairs: expected >= 1, got {n_pairs}")
    if n_outcomes < 2:
        raise ConfigError(f"n_outcomes: expected >= 2, got {n_outcomes}")
    torch_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        dirichlet = Dirichlet(torch.ones(n_outcomes, dtype=_DT))
        p, q = dirichlet.sample((n_pairs,)), dirichlet.sample((n_pairs,))
    finally:
        torch.random.set_rng_state(torch_state)
    kl_pq, kl_qp = kl_discrete(p, q), kl_discrete(q, p)
    ref = kl_divergence(Categorical(probs=p), Categorical(probs=q))
    return GibbsCheck(
        n_pairs=n_pairs,
        n_outcomes=n_outcomes,
        min_kl=float(torch.minimum(kl_pq, kl_qp).min()),
        n_negative=int(((kl_pq < 0) | (kl_qp < 0)).sum()),
        max_abs_diff_torch=float((kl_pq - ref).abs().max()),
        mean_abs_asymmetry=float((kl_pq - kl_qp).abs().mean()),
    )


@dataclass(frozen=True)
class MCConvergence:
    """Monte Carlo KL estimates as the number of samples grows."""

    exact: float
    """Closed-form KL (nats)."""
    ns: np.ndarray
    """Sample sizes."""
    estimates: np.ndarray
    """`[len(ns)]` one estimate per sample size (independent draws)."""
    stderrs: np.ndarray
    """`[len(ns)]` their standard errors."""
    rms_errors: np.ndarray
    """`[len(ns)]` root-mean-square error over `repeats` independent estimates."""
    repeats: int
    """Independent estimates per sample size behind `rms_errors`."""
    sd: float
    r"""Standard deviation of one log-ratio $w$ (so the predicted RMS error is `sd/sqrt(n)`)."""


def mc_convergence(
    mu1: Tensor,
    sigma1: Tensor,
    mu2: Tensor,
    sigma2: Tensor,
    ns: list[int] | np.ndarray,
    repeats: int = 20,
    seed: int = 0,
) -> MCConvergence:
    """Monte Carlo estimates of a diagonal-Gaussian KL for growing sample sizes `ns`.

    Args:
        mu1: mean of $q$ (the sampling distribution).
        sigma1: standard deviations of $q$.
        mu2: mean of $p$.
        sigma2: standard deviations of $p$.
        ns: sample sizes, each $\\ge 2$.
        repeats: independent estimates per size for the RMS error.
        seed: random seed.
    """
    if repeats < 1:
        raise ConfigError(f"repeats: expected >= 1, got {repeats}")
    gen = torch.Generator().manual_seed(seed)
    exact = float(
        diag_gaussian_kl(
            *(torch.atleast_1d(torch.as_tensor(v, dtype=_DT)) for v in (mu1, sigma1, mu2, sigma2))
        )
    )
    ns_arr = np.asarray(ns, dtype=np.int64)
    est, se, rms = [], [], []
    for n in ns_arr:
        runs = [mc_gaussian_kl(mu1, sigma1, mu2, sigma2, int(n), gen) for _ in range(repeats)]
        est.append(runs[0][0])
        se.append(runs[0][1])
        rms.append(math.sqrt(np.mean([(e - exact) ** 2 for e, _ in runs])))
    big = mc_gaussian_kl(mu1, sigma1, mu2, sigma2, 200_000, gen)
    return MCConvergence(
        exact=exact,
        ns=ns_arr,
        estimates=np.array(est),
        stderrs=np.array(se),
        rms_errors=np.array(rms),
        repeats=repeats,
        sd=big[1] * math.sqrt(200_000),
    )


@dataclass(frozen=True)
class InformationResult:
    """Numbers of lesson 4 (nats unless the name says bits)."""

    p: tuple[float, ...]
    """Worked example p = (0.3, 0.7)."""
    q: tuple[float, ...]
    """Worked example q = (0.5, 0.5)."""
    information_p_nats: tuple[float, ...]
    """−ln p_i for each outcome."""
    information_p_bits: tuple[float, ...]
    """−log2 p_i for each outcome."""
    entropy_p_nats: float
    """H(p) in nats."""
    entropy_p_bits: float
    """H(p) in bits."""
    entropy_q_bits: float
    """H(q) in bits (1 bit for a fair coin)."""
    kl_pq_nats: float
    """KL(p‖q) in nats."""
    kl_qp_nats: float
    """KL(q‖p) in nats."""
    kl_pq_bits: float
    """KL(p‖q) in bits."""
    kl_qp_bits: float
    """KL(q‖p) in bits."""
    kl_pq_torch: float
    """torch.distributions.kl_divergence(Categorical(p), Categorical(q))."""
    p3: tuple[float, ...]
    """Three-outcome example p."""
    q3: tuple[float, ...]
    """Three-outcome example q."""
    kl3_pq_nats: float
    """KL(p3‖q3) in nats."""
    kl3_qp_nats: float
    """KL(q3‖p3) in nats."""
    kl3_pq_torch: float
    """torch's KL(p3‖q3)."""
    gibbs: GibbsCheck
    """KL >= 0 on many random pairs."""
    gauss_params: tuple[float, float, float, float]
    """(mu1, sigma1, mu2, sigma2) of the scalar Gaussian example."""
    gauss_kl: float
    """Closed-form KL of the scalar Gaussian example."""
    gauss_kl_torch: float
    """torch's kl_divergence(Normal, Normal) for the same."""
    diag_kl: float
    """Closed-form KL of the diagonal (3-d) Gaussian example."""
    diag_kl_torch: float
    """torch's kl_divergence on Independent(Normal) for the same."""
    mc: MCConvergence
    """Monte Carlo estimates of the diagonal example as n grows."""


def information_lesson(seed: int = 0, mc_repeats: int = 20) -> InformationResult:
    """Compute every number of lesson 4.

    Args:
        seed: random seed of the Gibbs check and of the Monte Carlo estimates.
        mc_repeats: independent MC estimates per sample size.
    """
    p, q = (0.3, 0.7), (0.5, 0.5)
    p3, q3 = (0.2, 0.5, 0.3), (0.1, 0.1, 0.8)
    cat = Categorical
    mu1, s1, mu2, s2 = 0.0, 1.0, 1.0, 2.0
    dm1 = torch.tensor([0.0, 1.0, -0.5], dtype=_DT)
    ds1 = torch.tensor([1.0, 0.5, 2.0], dtype=_DT)
    dm2 = torch.tensor([0.5, 0.0, 0.0], dtype=_DT)
    ds2 = torch.tensor([1.5, 1.0, 1.0], dtype=_DT)
    ns = np.unique(np.round(np.logspace(1, 5, 13)).astype(int))
    return InformationResult(
        p=p,
        q=q,
        information_p_nats=tuple(information(torch.tensor(p)).tolist()),
        information_p_bits=tuple(information(torch.tensor(p), base=2).tolist()),
        entropy_p_nats=float(entropy(p)),
        entropy_p_bits=float(entropy(p, base=2)),
        entropy_q_bits=float(entropy(q, base=2)),
        kl_pq_nats=float(kl_discrete(p, q)),
        kl_qp_nats=float(kl_discrete(q, p)),
        kl_pq_bits=float(kl_discrete(p, q, base=2)),
        kl_qp_bits=float(kl_discrete(q, p, base=2)),
        kl_pq_torch=float(
            kl_divergence(cat(torch.tensor(p, dtype=_DT)), cat(torch.tensor(q, dtype=_DT)))
        ),
        p3=p3,
        q3=q3,
        kl3_pq_nats=float(kl_discrete(p3, q3)),
        kl3_qp_nats=float(kl_discrete(q3, p3)),
        kl3_pq_torch=float(
            kl_divergence(cat(torch.tensor(p3, dtype=_DT)), cat(torch.tensor(q3, dtype=_DT)))
        ),
        gibbs=gibbs_check(seed=seed),
        gauss_params=(mu1, s1, mu2, s2),
        gauss_kl=float(gaussian_kl(mu1, s1, mu2, s2)),
        gauss_kl_torch=float(
            kl_divergence(
                Normal(torch.tensor(mu1, dtype=_DT), s1), Normal(torch.tensor(mu2, dtype=_DT), s2)
            )
        ),
        diag_kl=float(diag_gaussian_kl(dm1, ds1, dm2, ds2)),
        diag_kl_torch=float(
            kl_divergence(Independent(Normal(dm1, ds1), 1), Independent(Normal(dm2, ds2), 1))
        ),
        mc=mc_convergence(dm1, ds1, dm2, ds2, ns, repeats=mc_repeats, seed=seed),
    )


def plot_information(result: InformationResult, path: str | Path) -> Path:
    """Figure of lesson 4.

    (a) $\\mathrm{KL}(p\\|q)$ and $\\mathrm{KL}(q\\|p)$ for $p = (a, 1-a)$, $q = (0.5, 0.5)$;
    (b) the Monte Carlo estimate with a ±2 standard-error band converging to the closed form;
    (c) its RMS error against $n$ (log–log) with the predicted $\\mathrm{sd}/\\sqrt n$.

    Args:
        result: output of [`information_lesson`][pyrovae.teaching.information.information_lesson].
        path: where to write the image.
    """
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)

    a = torch.linspace(0.005, 0.995, 199, dtype=_DT)
    ps = torch.stack([a, 1 - a], -1)
    qs = torch.full_like(ps, 0.5)
    ax1.plot(a, kl_discrete(ps, qs), label=r"KL(p‖q)")
    ax1.plot(a, kl_discrete(qs, ps), "--", label=r"KL(q‖p)")
    ax1.plot([result.p[0]] * 2, [result.kl_pq_nats, result.kl_qp_nats], "ko", ms=4)
    ax1.annotate(
        f"p=(0.3,0.7): {result.kl_pq_nats:.4f} vs {result.kl_qp_nats:.4f}",
        (result.p[0], result.kl_qp_nats),
        xytext=(0.32, 0.45),
        textcoords="axes fraction",
        arrowprops={"arrowstyle": "->", "lw": 0.6},
    )
    ax1.set_xlabel("p = (a, 1 − a),  q = (0.5, 0.5):  a")
    ax1.set_ylabel("nats")
    ax1.set_ylim(0, 1.2)
    ax1.set_title("KL is not symmetric")
    ax1.legend()

    mc = result.mc
    ax2.axhline(mc.exact, color="k", lw=1, label="closed form")
    ax2.fill_between(
        mc.ns,
        mc.estimates - 2 * mc.stderrs,
        mc.estimates + 2 * mc.stderrs,
        alpha=0.3,
        label="±2 s.e.",
    )
    ax2.plot(mc.ns, mc.estimates, "o-", ms=3, label="MC estimate")
    ax2.set_xscale("log")
    ax2.set_xlabel("samples n")
    ax2.set_ylabel("KL (nats)")
    ax2.set_title("Monte Carlo vs closed form")
    ax2.legend()

    ax3.loglog(mc.ns, mc.rms_errors, "o", ms=4, label=f"RMS error ({mc.repeats} runs)")
    ax3.loglog(mc.ns, mc.sd / np.sqrt(mc.ns), "-", label=r"sd/$\sqrt{n}$")
    ax3.set_xlabel("samples n")
    ax3.set_ylabel("|error| (nats)")
    ax3.set_title(r"error shrinks like $1/\sqrt{n}$")
    ax3.legend()
    fig.savefig(path, dpi=110)
    return path
