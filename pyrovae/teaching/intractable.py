r"""Lesson 5 — the marginal likelihood $p(x) = \int p(x\mid z)\,p(z)\,dz$ is intractable.

A VAE's decoder is a neural network, so the integral

$$p_\theta(x) = \int_{\mathbb R^d} p_\theta(x \mid z)\, p(z)\, dz$$

has no closed form. In a latent space of size $d = 1$ or $2$ we can still compute it by brute
force: the trapezoid rule on a grid of $n$ points per axis over $[-L, L]^d$,

$$\log p(x) \approx \log \sum_{g} w_g\, p(x \mid z_g)\, p(z_g),
\qquad w_g = \prod_{i=1}^d h\,c_{g_i},\; h = \tfrac{2L}{n-1},\; c = (\tfrac12, 1, \dots, 1, \tfrac12),$$

(evaluated with log-sum-exp), doubling the resolution until the answer moves by less than
$10^{-3}$ nats. That is the gold standard the estimators are judged against:

* **naive Monte Carlo from the prior**: $\log \frac1K \sum_k p(x \mid z_k)$, $z_k \sim p(z)$ —
  importance sampling with the prior as proposal. Few $z_k$ land where $p(x\mid z)$ is large
  (the posterior is much narrower than the prior), and the fraction that do shrinks
  exponentially with $d$;
* **importance sampling from $q$**: $\log \frac1K \sum_k \frac{p(x, z_k)}{q(z_k\mid x)}$,
  $z_k \sim q(z \mid x)$ — the IWAE bound (Burda et al. 2016), $\le \log p(x)$ in expectation,
  increasing in $K$ and converging to $\log p(x)$;
* **the ELBO**, $\mathbb E_q[\log p(x, z) - \log q(z\mid x)] = \log p(x) - \mathrm{KL}(q \,\|\, p(z\mid x))$,
  computed here on the same grid (no Monte Carlo noise), so ELBO $\le$ IS $\le \log p(x)$.

The grid needs $n^d$ decoder evaluations: with the $n$ that gives $10^{-3}$ nats in $d = 1, 2$,
the same accuracy in $d = 6$ costs $n^6$ — the *curse of dimensionality*, and the reason VAEs
optimise a bound with a sampled, amortized $q$ instead.

References:
    D. P. Kingma, M. Welling (2014), *Auto-encoding variational Bayes*, ICLR.
    Y. Burda, R. Grosse, R. Salakhutdinov (2016), *Importance weighted autoencoders*, ICLR.
    R. Bellman (1961), *Adaptive Control Processes*, (the curse of dimensionality).
    L. N. Trefethen, J. A. C. Weideman (2014), *The exponentially convergent trapezoidal rule*,
    SIAM Review 56.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from torch import Tensor

from pyrovae import evaluate
from pyrovae.errors import ConfigError
from pyrovae.teaching.deep_vs_linear import fit_quietly

__all__ = [
    "IntractableResult",
    "LatentSizeResult",
    "Quadrature",
    "Refinement",
    "ess_fraction",
    "estimates_from_weights",
    "grid_cost",
    "intractable_lesson",
    "log_weight_matrix",
    "plot_intractable",
    "prior_guide",
    "quadrature",
    "refine_quadrature",
    "trapezoid_grid",
    "vae_config",
]

_DT = torch.float64


def vae_config(
    latent_dim: int,
    hidden: Sequence[int] = (64,),
    scale: float = 0.3,
    epochs: int = 30,
    lr: float = 3e-3,
    batch_size: int = 128,
    seed: int = 0,
) -> dict[str, Any]:
    """A small digits VAE: MLP encoder/decoder, $\\mathcal N(0, I)$ prior, normal likelihood
    with fixed scale `scale` (a smooth, nearly Gaussian posterior)."""
    hidden = [int(h) for h in hidden]
    return {
        "data": {"dataset": "digits"},
        "model": {
            "kind": "vae",
            "latent_dim": latent_dim,
            "encoder": {"kind": "mlp", "hidden": hidden},
            "decoder": {"kind": "mlp", "hidden": hidden[::-1]},
            "prior": {"kind": "normal"},
            "likelihood": {"kind": "normal", "scale": scale},
        },
        "train": {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "device": "cpu",
        },
    }


def grid_cost(n: int, d: int) -> int:
    """Number of grid points (= decoder evaluations) of an $n$-per-axis grid in $d$ dimensions, $n^d$."""
    if n < 2 or d < 1:
        raise ConfigError(f"grid_cost: expected n >= 2 and d >= 1, got n={n}, d={d}")
    return n**d


def trapezoid_grid(L: float, n: int, d: int, dtype: torch.dtype = _DT) -> tuple[Tensor, Tensor]:
    r"""Points and log-weights of the product trapezoid rule on $[-L, L]^d$, $n$ points per axis.

    Returns:
        `(z [n^d, d], log_w [n^d])` with $\sum_g e^{\log w_g} = (2L)^d$.
    """
    if not L > 0 or n < 2 or d < 1:
        raise ConfigError(f"trapezoid_grid: expected L > 0, n >= 2, d >= 1; got {L}, {n}, {d}")
    axis = torch.linspace(-L, L, n, dtype=dtype)
    h = 2 * L / (n - 1)
    lw = torch.full((n,), math.log(h), dtype=dtype)
    lw[0] = lw[-1] = math.log(h / 2)
    mesh = torch.meshgrid(*([axis] * d), indexing="ij")
    wmesh = torch.meshgrid(*([lw] * d), indexing="ij")
    z = torch.stack([m.reshape(-1) for m in mesh], -1)
    return z, torch.stack([w.reshape(-1) for w in wmesh], -1).sum(-1)


@dataclass(frozen=True)
class Quadrature:
    """$\\log p(x)$ and the ELBO of each datapoint by the trapezoid rule (nats)."""

    log_px: Tensor
    """`[N]` $\\log \\int p(x\\mid z) p(z) dz$."""
    elbo: Tensor
    """`[N]` $\\int q(z\\mid x) \\log\\frac{p(x, z)}{q(z\\mid x)} dz$."""
    q_mass: Tensor
    """`[N]` $\\int q(z\\mid x) dz$ on the grid (≈ 1: the grid covers $q$)."""
    n: int
    """Points per axis."""
    evaluations: int
    """Grid points = decoder evaluations, $n^d$."""
    seconds: float
    """Wall time."""


@torch.no_grad()
def quadrature(vae: Any, x: Tensor, L: float = 6.0, n: int = 65, chunk: int = 4096) -> Quadrature:
    r"""Trapezoid-rule $\log p(x)$ and ELBO for every row of `x` (one pass over the grid).

    For each grid point $z_g$ the decoder runs once and $\log p(x_n \mid z_g) + \log p(z_g)$ is
    scored for all $N$ datapoints; the log-sum-exp over the grid is accumulated chunk by chunk.
    The same pass integrates $q(z\mid x_n)\,[\log p(x_n, z) - \log q(z \mid x_n)]$ for the ELBO.

    Args:
        vae: a [`pyrovae.VAE`][pyrovae.VAE] with a Gaussian guide (float64 recommended).
        x: `[N, D]` datapoints (same dtype as the VAE).
        L: half-width of the box $[-L, L]^d$.
        n: points per axis.
        chunk: grid points per decoder call.
    """
    if vae.config.guide.kind != "normal":
        raise ConfigError(
            f"quadrature: the ELBO on the grid needs the Gaussian guide (model.guide.kind = "
            f'"normal"), got {vae.config.guide.kind!r}'
        )
    d = vae.latent_dim
    z_all, lw_all = trapezoid_grid(L, n, d, dtype=x.dtype)
    t = time.perf_counter()
    q_loc, q_scale = vae.posterior.encode(x)
    q = torch.distributions.Normal(q_loc, q_scale)
    prior = vae.prior()
    log_px = torch.full((x.shape[0],), -math.inf, dtype=x.dtype)
    elbo = torch.zeros(x.shape[0], dtype=x.dtype)
    q_mass = torch.zeros(x.shape[0], dtype=x.dtype)
    for z, lw in zip(z_all.split(chunk), lw_all.split(chunk), strict=True):
        log_joint = vae.likelihood_dist(z.unsqueeze(1)).log_prob(x) + prior.log_prob(z)[:, None]
        log_px = torch.logaddexp(log_px, torch.logsumexp(log_joint + lw[:, None], 0))
        log_q = q.log_prob(z.unsqueeze(1)).sum(-1)  # [G, N]
        wq = (log_q + lw[:, None]).exp()
        elbo += (wq * (log_joint - log_q)).sum(0)
        q_mass += wq.sum(0)
    return Quadrature(
        log_px=log_px,
        elbo=elbo,
        q_mass=q_mass,
        n=n,
        evaluations=grid_cost(n, d),
        seconds=time.perf_counter() - t,
    )


@dataclass(frozen=True)
class Refinement:
    """Successive trapezoid estimates as the grid is refined ($n \\to 2n - 1$, nested grids)."""

    levels: tuple[Quadrature, ...]
    """One quadrature per resolution."""
    tol: float
    """Stopping tolerance (nats)."""

    @property
    def ns(self) -> list[int]:
        """Points per axis at each level."""
        return [q.n for q in self.levels]

    @property
    def changes(self) -> list[float]:
        """max over datapoints of |log p(x) at this level − previous level| (first: nan)."""
        out = [math.nan]
        for a, b in zip(self.levels[:-1], self.levels[1:], strict=True):
            out.append(float((b.log_px - a.log_px).abs().max()))
        return out

    @property
    def elbo_changes(self) -> list[float]:
        """The same for the ELBO."""
        out = [math.nan]
        for a, b in zip(self.levels[:-1], self.levels[1:], strict=True):
            out.append(float((b.elbo - a.elbo).abs().max()))
        return out

    @property
    def converged(self) -> bool:
        """Whether the last refinement moved log p(x) and the ELBO by less than `tol`."""
        return len(self.levels) > 1 and max(self.changes[-1], self.elbo_changes[-1]) < self.tol

    @property
    def final(self) -> Quadrature:
        """The finest level."""
        return self.levels[-1]

    @property
    def n_needed(self) -> int:
        """The coarser of the last two resolutions — already within `tol` of the finer one."""
        return self.levels[-2].n if len(self.levels) > 1 else self.levels[-1].n


def refine_quadrature(
    vae: Any,
    x: Tensor,
    L: float = 6.0,
    n0: int = 17,
    tol: float = 1e-3,
    max_evaluations: int = 2_000_000,
) -> Refinement:
    """Double the grid resolution until log p(x) and the ELBO change by less than `tol` nats.

    Grids are nested ($n_{j+1} = 2 n_j - 1$), so every level reuses the previous points' span.
    Stops early (`converged = False`) if the next grid would exceed `max_evaluations` points.
    """
    if n0 < 2 or not tol > 0:
        raise ConfigError(f"refine_quadrature: expected n0 >= 2 and tol > 0, got {n0}, {tol}")
    levels = [quadrature(vae, x, L, n0)]
    n = n0
    while True:
        n = 2 * n - 1
        if grid_cost(n, vae.latent_dim) > max_evaluations:
            break
        levels.append(quadrature(vae, x, L, n))
        ref = Refinement(tuple(levels), tol)
        if ref.converged:
            return ref
    return Refinement(tuple(levels), tol)


def prior_guide(vae: Any) -> Callable[..., Tensor]:
    """A Pyro guide that proposes $z \\sim p(z)$: importance sampling with it is naive Monte Carlo.

    With this proposal $\\frac{p(x, z)}{p(z)} = p(x \\mid z)$, so
    [`pyrovae.evaluate.log_likelihood`][pyrovae.evaluate.log_likelihood] computes
    $\\log\\frac1K\\sum_k p(x\\mid z_k)$, $z_k \\sim p(z)$.
    """

    def guide(x: Tensor, n_data: int | None = None) -> Tensor:
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", vae.prior())

    return guide


def log_weight_matrix(
    vae: Any, x: Tensor, m: int, proposal: str = "q", seed: int = 0, chunk: int = 10_000
) -> Tensor:
    r"""`m` log importance weights per datapoint, shape `[m, N]` (float64).

    `proposal="q"`: $\log w = \log p(x, z) - \log q(z\mid x)$, $z \sim q(z\mid x)$;
    `"prior"`: $\log w = \log p(x\mid z)$, $z \sim p(z)$ (naive Monte Carlo). Drawn with
    [`pyrovae.evaluate.log_weights`][pyrovae.evaluate.log_weights] in chunks of `chunk`
    particles, from a seeded, forked RNG.
    """
    if proposal not in ("q", "prior"):
        raise ConfigError(f"proposal: expected 'q' or 'prior', got {proposal!r}")
    if m < 1:
        raise ConfigError(f"m: expected >= 1, got {m}")
    guide = vae.guide if proposal == "q" else prior_guide(vae)
    out = []
    with evaluate.evaluation_mode(vae), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        done = 0
        while done < m:
            k = min(chunk, m - done)
            out.append(evaluate.log_weights(vae.model, guide, x, k).double())
            done += k
    return torch.cat(out)


def estimates_from_weights(log_w: Tensor, k: int) -> Tensor:
    r"""Independent $K$-sample estimates $\log\frac1K\sum_{k} w_k$ from disjoint groups of `log_w`.

    Splits the `[M, N]` log weights into $\lfloor M/K \rfloor$ groups of $K$ and returns each
    group's log-mean-exp, shape `[M // K, N]`: repeated estimates for the price of one draw.
    """
    m = log_w.shape[0]
    if not 1 <= k <= m:
        raise ConfigError(f"k: expected 1 <= k <= {m}, got {k}")
    groups = log_w[: (m // k) * k].reshape(m // k, k, -1)
    return torch.logsumexp(groups, 1) - math.log(k)


def ess_fraction(log_w: Tensor) -> Tensor:
    r"""Effective sample size over the number of draws, per datapoint, from `[M, N]` log weights.

    $\mathrm{ESS}/M = \frac{(\sum_k w_k)^2}{M \sum_k w_k^2} \in (0, 1]$ (Kong 1992): the share of
    the draws that effectively count.
    """
    lw = log_w - log_w.max(0).values
    w = lw.exp()
    return w.sum(0).pow(2) / (log_w.shape[0] * w.pow(2).sum(0))


@dataclass(frozen=True)
class LatentSizeResult:
    """Everything measured for the VAE with one latent size (nats, per image)."""

    latent_dim: int
    """$d$."""
    test_elbo: float
    """Mean Monte Carlo ELBO over the whole test split (from the training run)."""
    refinement: Refinement
    """The quadrature at each resolution."""
    log_px: np.ndarray
    """`[N]` $\\log p(x)$ by quadrature (finest grid)."""
    elbo: np.ndarray
    """`[N]` ELBO by quadrature."""
    elbo_mc: np.ndarray
    """`[N]` ELBO by Monte Carlo (`pyrovae.evaluate.elbo`)."""
    elbo_mc_particles: int
    """Particles of that estimate."""
    boundary_change: float
    """max |log p(x) on $[-L-2, L+2]^d$ − on $[-L, L]^d$|: the box is large enough."""
    ks: tuple[int, ...]
    """Sample sizes $K$."""
    repeats: int
    """Independent estimates per $K$ (at the largest $K$)."""
    is_q: tuple[np.ndarray, ...]
    """Per $K$: `[R_K, N]` independent importance-sampling estimates (proposal $q$)."""
    is_prior: tuple[np.ndarray, ...]
    """Per $K$: `[R_K, N]` independent naive Monte Carlo estimates (proposal $p(z)$)."""
    is_library: np.ndarray
    """`[N]` `pyrovae.evaluate.log_likelihood` with the largest $K$ (a fresh draw)."""
    ess_q: np.ndarray
    """`[N]` ESS / draws of the $q$ proposal."""
    ess_prior: np.ndarray
    """`[N]` ESS / draws of the prior proposal."""

    def _bias(self, est: tuple[np.ndarray, ...]) -> np.ndarray:
        return np.array([(e - self.log_px).mean() for e in est])

    @property
    def is_bias(self) -> np.ndarray:
        """`[len(ks)]` mean over repeats and images of (IS from q − quadrature); ≤ 0 in expectation."""
        return self._bias(self.is_q)

    @property
    def prior_bias(self) -> np.ndarray:
        """`[len(ks)]` the same for naive Monte Carlo."""
        return self._bias(self.is_prior)

    @property
    def is_max_error(self) -> np.ndarray:
        """`[len(ks)]` max over repeats and images of |IS from q − quadrature|."""
        return np.array([np.abs(e - self.log_px).max() for e in self.is_q])

    @property
    def prior_max_error(self) -> np.ndarray:
        """`[len(ks)]` max over repeats and images of |naive MC − quadrature|."""
        return np.array([np.abs(e - self.log_px).max() for e in self.is_prior])

    @property
    def gap(self) -> np.ndarray:
        """`[N]` log p(x) − ELBO = KL(q(z|x) ‖ p(z|x)) ≥ 0."""
        return self.log_px - self.elbo

    seconds_per_point: float
    """Wall time per grid point (decoder + likelihood for all images): best of 3 timed runs on a
    grid of about 16,384 points."""


@dataclass(frozen=True)
class IntractableResult:
    """Numbers of lesson 5."""

    per_dim: tuple[LatentSizeResult, ...]
    """One entry per trained latent size."""
    n_images: int
    """Test images evaluated."""
    scale: float
    """Likelihood scale $\\sigma$."""
    L: float
    """Half-width of the grid box."""
    tol: float
    """Quadrature tolerance (nats)."""
    grid_n: int
    """Points per axis that reached `tol` (largest over the trained latent sizes)."""
    dims: np.ndarray
    """Latent sizes $d = 1, \\dots$ for the cost curve."""
    grid_evaluations: np.ndarray
    """$n^d$ for each $d$ (float, to hold large values)."""
    seconds_per_point: float
    """Measured seconds per grid point (the smallest over trained sizes)."""

    @property
    def projected_seconds(self) -> np.ndarray:
        """Projected wall time of the grid for each $d$."""
        return self.grid_evaluations * self.seconds_per_point

    def at(self, d: int) -> LatentSizeResult:
        """The result for latent size `d`."""
        for r in self.per_dim:
            if r.latent_dim == d:
                return r
        raise KeyError(f"latent size {d} not in {[r.latent_dim for r in self.per_dim]}")


def intractable_lesson(
    latent_dims: Sequence[int] = (1, 2),
    n_images: int = 6,
    ks: Sequence[int] = (1, 10, 100, 1000, 10000),
    hidden: Sequence[int] = (64,),
    scale: float = 0.3,
    epochs: int = 30,
    L: float = 6.0,
    tol: float = 1e-3,
    repeats: int = 5,
    elbo_particles: int = 1000,
    max_dim: int = 6,
    seed: int = 0,
    workdir: str | Path | None = None,
) -> IntractableResult:
    """Train small VAEs and compare quadrature, naive Monte Carlo, importance sampling and the ELBO.

    Args:
        latent_dims: latent sizes to train (1 and 2: the grid is affordable there).
        n_images: test images whose log p(x) is computed.
        ks: sample sizes of the Monte Carlo estimators.
        hidden: hidden layers of encoder (decoder mirrored).
        scale: the normal likelihood's fixed $\\sigma$.
        epochs: training epochs per VAE.
        L: the grid covers $[-L, L]^d$.
        tol: quadrature tolerance in nats.
        repeats: independent estimates at the largest $K$ (more at smaller $K$: the
            `repeats * max(ks)` draws are split into disjoint groups of $K$).
        elbo_particles: particles of the Monte Carlo ELBO.
        max_dim: the cost curve goes to this latent size.
        seed: seed of training and of the estimators.
        workdir: keep the run folders there (default: temporary).
    """
    dims = tuple(int(d) for d in latent_dims)
    if not dims or any(d not in (1, 2, 3) for d in dims):
        raise ConfigError(f"latent_dims: expected sizes in 1..3 (a grid is n^d), got {dims}")
    if n_images < 1 or not ks or min(ks) < 1 or repeats < 1:
        raise ConfigError("n_images >= 1, repeats >= 1 and sample sizes ks >= 1 required")
    ks = tuple(int(k) for k in ks)
    per_dim = []
    for d in dims:
        wd = None if workdir is None else Path(workdir) / f"vae_d{d}"
        run = fit_quietly(vae_config(d, hidden, scale, epochs, seed=seed), wd)
        vae = copy.deepcopy(run.model).double().eval()
        x = run.data.x_test[:n_images].double()
        ref = refine_quadrature(vae, x, L=L, tol=tol)
        fine = ref.final
        h = 2 * L / (fine.n - 1)
        wide = quadrature(vae, x, L + 2.0, int(round(2 * (L + 2.0) / h)) + 1)
        with evaluate.evaluation_mode(vae), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            elbo_mc = evaluate.elbo(vae.model, vae.guide, x, elbo_particles)
        n_time = max(2, round(16384 ** (1 / d)))
        seconds = min(quadrature(vae, x, L, n_time).seconds for _ in range(3))
        kmax = max(ks)
        lw_q = log_weight_matrix(vae, x, repeats * kmax, "q", seed)
        lw_p = log_weight_matrix(vae, x, repeats * kmax, "prior", seed + 1)
        with evaluate.evaluation_mode(vae), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 2)
            lib = evaluate.log_likelihood(vae.model, vae.guide, x, kmax)
        per_dim.append(
            LatentSizeResult(
                latent_dim=d,
                test_elbo=float(run.metrics["test_elbo"]),
                refinement=ref,
                log_px=fine.log_px.numpy(),
                elbo=fine.elbo.numpy(),
                elbo_mc=elbo_mc.numpy(),
                elbo_mc_particles=elbo_particles,
                boundary_change=float((wide.log_px - fine.log_px).abs().max()),
                ks=ks,
                repeats=repeats,
                is_q=tuple(estimates_from_weights(lw_q, k).numpy() for k in ks),
                is_prior=tuple(estimates_from_weights(lw_p, k).numpy() for k in ks),
                is_library=lib.numpy(),
                ess_q=ess_fraction(lw_q).numpy(),
                ess_prior=ess_fraction(lw_p).numpy(),
                seconds_per_point=seconds / grid_cost(n_time, d),
            )
        )
    grid_n = max(r.refinement.n_needed for r in per_dim)
    all_dims = np.arange(1, max_dim + 1)
    return IntractableResult(
        per_dim=tuple(per_dim),
        n_images=n_images,
        scale=scale,
        L=L,
        tol=tol,
        grid_n=grid_n,
        dims=all_dims,
        grid_evaluations=np.array([float(grid_cost(grid_n, int(d))) for d in all_dims]),
        seconds_per_point=min(r.seconds_per_point for r in per_dim),
    )


def _duration(seconds: float) -> str:
    for unit, s in (("years", 3.15e7), ("days", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= s:
            return f"{seconds / s:.3g} {unit}"
    return f"{seconds:.2g} s"


def plot_intractable(result: IntractableResult, path: str | Path) -> Path:
    """Figure of lesson 5.

    One panel per latent size: estimate − quadrature $\\log p(x)$ (mean over the images, bars:
    min..max) against $K$ for naive Monte Carlo and importance sampling from $q$, with the ELBO.
    Last panel: decoder evaluations of the grid, $n^d$, against $d$, next to the $K$ of
    importance sampling, annotated with the projected wall time.

    Args:
        result: output of [`intractable_lesson`][pyrovae.teaching.intractable.intractable_lesson].
        path: where to write the image.

    Returns:
        The path written.
    """
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_panels = len(result.per_dim) + 1
    fig = Figure(figsize=(4.6 * n_panels, 4.0), layout="constrained")
    axes = fig.subplots(1, n_panels)
    for ax, r in zip(axes[:-1], result.per_dim, strict=True):
        ks = np.array(r.ks)
        for est, name, marker in (
            (r.is_prior, "naive MC, z ~ p(z)", "s"),
            (r.is_q, "IS, z ~ q(z|x)", "o"),
        ):
            diffs = [e - r.log_px for e in est]
            mean = np.array([dd.mean() for dd in diffs])
            lo = np.array([np.quantile(dd, 0.1) for dd in diffs])
            hi = np.array([np.quantile(dd, 0.9) for dd in diffs])
            (line,) = ax.plot(ks, mean, marker=marker, ms=4, label=name)
            ax.fill_between(ks, lo, hi, color=line.get_color(), alpha=0.2)
        ax.axhline(0.0, color="k", lw=1, label="log p(x), quadrature")
        ax.axhline(-float(r.gap.mean()), color="tab:red", ls="--", lw=1, label="ELBO, quadrature")
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_xlabel("samples K")
        ax.set_ylabel("estimate − log p(x)  (nats)")
        ax.set_title(
            f"d = {r.latent_dim}: mean over {len(r.log_px)} images (band: 10–90%)", fontsize=10
        )
        ax.legend(fontsize=7, loc="lower right")
    ax = axes[-1]
    ax.semilogy(
        result.dims, result.grid_evaluations, "o-", label=f"grid, n = {result.grid_n} per axis"
    )
    kmax = max(result.per_dim[0].ks)
    ax.axhline(kmax, color="tab:green", ls="--", label=f"importance sampling, K = {kmax:,}")
    for d, ev, s in zip(
        result.dims, result.grid_evaluations, result.projected_seconds, strict=True
    ):
        ax.annotate(
            _duration(float(s)), (d, ev), textcoords="offset points", xytext=(-8, 6), fontsize=7
        )
    ax.set_ylim(top=float(result.grid_evaluations.max()) * 50)
    ax.set_xlim(0.6, float(result.dims.max()) + 0.6)
    ax.set_xlabel("latent size d")
    ax.set_ylabel("decoder evaluations per image batch")
    ax.set_title(f"cost of the grid to {result.tol:g} nats: n^d", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.savefig(path, dpi=110)
    return path
