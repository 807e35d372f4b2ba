r"""Probabilistic PCA: a linear VAE whose every quantity has a closed form.

The generative model (Tipping & Bishop 1999) is

$$z \sim \mathcal N(0, I_k), \qquad x \mid z \sim \mathcal N(W z + \mu, \sigma^2 I_D),$$

with $W \in \mathbb R^{D \times k}$. Integrating $z$ out,

$$p(x) = \mathcal N(x;\, \mu,\, C), \qquad C = W W^\top + \sigma^2 I_D,$$

and the posterior is Gaussian with a covariance shared by all datapoints,

$$p(z \mid x) = \mathcal N\big(M^{-1} W^\top (x - \mu),\; \sigma^2 M^{-1}\big),
\qquad M = W^\top W + \sigma^2 I_k .$$

For any Gaussian $q(z) = \mathcal N(m, S)$ the ELBO is analytic too:

$$\mathrm{ELBO}(q) = \underbrace{-\tfrac D2 \log(2\pi\sigma^2)
 - \tfrac{1}{2\sigma^2}\big(\lVert x - \mu - W m\rVert^2 + \operatorname{tr}(W^\top W S)\big)}_{\mathbb E_q[\log p(x\mid z)]}
 \underbrace{- \tfrac k2 \log 2\pi - \tfrac12\big(\lVert m\rVert^2 + \operatorname{tr} S\big)}_{\mathbb E_q[\log p(z)]}
 + \underbrace{\tfrac k2 (1 + \log 2\pi) + \tfrac12 \log\lvert S\rvert}_{H[q]} .$$

This makes pPCA the exact test bed for every estimator of $\log p(x)$, of the ELBO and of
$\mathrm{KL}(q \,\|\, p(z\mid x))$: the model here is a real Pyro program (site `"z"` latent,
site `"x"` observed, both inside `pyro.plate("data", N)`) and the guides are real Pyro
guides, so `Trace_ELBO`, `TraceMeanField_ELBO`, `RenyiELBO`, importance sampling or MCMC
can be run on them and compared with the numbers below. Everything is float64.

References:
    M. E. Tipping, C. M. Bishop (1999), *Probabilistic principal component analysis*,
    J. R. Stat. Soc. B 61(3).
    C. M. Bishop (2006), *Pattern Recognition and Machine Learning*, §12.2 (pPCA), §2.3.3
    (linear-Gaussian posterior).
    J. Lucas, G. Tucker, R. Grosse, M. Norouzi (2019), *Don't blame the ELBO! A linear VAE
    perspective on posterior collapse*, NeurIPS.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import Tensor
from torch.distributions import MultivariateNormal, kl_divergence

from pyrovae.errors import ConfigError, DataError

__all__ = [
    "PPCA",
    "ELBOTerms",
    "Guide",
    "diagonal_guide",
    "elbo_closed_form",
    "elbo_terms",
    "exact_guide",
    "exact_kl_to_posterior",
    "fixed_gaussian_guide",
    "gaussian_guide",
    "learnable_gaussian_guide",
    "perturbed_guide",
    "perturbed_posterior",
]

DTYPE = torch.float64
"""All pPCA tensors are float64 so that identities can be checked to 1e-6 and beyond."""

Guide = Callable[[Tensor], None]
"""A Pyro guide `guide(x)` with `pyro.plate("data", N)` and a latent site `"z"`."""


@dataclass
class PPCA:
    r"""Probabilistic PCA $p(z) = \mathcal N(0, I_k)$, $p(x\mid z) = \mathcal N(Wz + \mu, \sigma^2 I_D)$.

    Tensors are converted to float64 on construction.

    Attributes:
        W: `[D, k]` loading matrix.
        mu: `[D]` mean of $x$.
        sigma: observation noise standard deviation $\sigma > 0$.
    """

    W: Tensor
    mu: Tensor
    sigma: float

    def __post_init__(self) -> None:
        self.W = torch.as_tensor(self.W, dtype=DTYPE)
        self.mu = torch.as_tensor(self.mu, dtype=DTYPE)
        self.sigma = float(self.sigma)
        if self.W.ndim != 2:
            raise ConfigError(f"W: expected a [D, k] matrix, got shape {tuple(self.W.shape)}")
        if self.mu.shape != (self.W.shape[0],):
            raise ConfigError(
                f"mu: expected shape ({self.W.shape[0]},), got {tuple(self.mu.shape)}"
            )
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ConfigError(f"sigma: expected a finite value > 0, got {self.sigma}")
        if not (torch.isfinite(self.W).all() and torch.isfinite(self.mu).all()):
            raise ConfigError("W, mu: must be finite")

    @classmethod
    def random(cls, D: int, k: int, sigma: float = 0.5, seed: int = 0) -> PPCA:
        r"""A random pPCA: $W_{ij} \sim \mathcal N(0, 1)$, $\mu_i \sim \mathcal N(0, 1)$.

        Args:
            D: data dimension.
            k: latent dimension ($1 \le k$).
            sigma: noise standard deviation.
            seed: seed of a private generator (the global RNG is untouched).
        """
        if D < 1 or k < 1:
            raise ConfigError(f"D, k: expected >= 1, got D={D}, k={k}")
        gen = torch.Generator().manual_seed(seed)
        W = torch.randn(D, k, generator=gen, dtype=DTYPE)
        mu = torch.randn(D, generator=gen, dtype=DTYPE)
        return cls(W=W, mu=mu, sigma=sigma)

    @property
    def D(self) -> int:
        """Data dimension."""
        return self.W.shape[0]

    @property
    def k(self) -> int:
        """Latent dimension."""
        return self.W.shape[1]

    def check_x(self, x: Tensor) -> Tensor:
        """Validate data `x` of shape `[N, D]` and return it as float64."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise DataError(f"x: expected a floating-point tensor, got {type(x).__name__}")
        if x.ndim != 2 or x.shape[1] != self.D:
            raise DataError(f"x: expected shape [N, {self.D}], got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise DataError("x: contains NaN or inf")
        return x.to(DTYPE)

    def sample(
        self, n: int, generator: torch.Generator | None = None, return_z: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        r"""Draw $n$ datapoints $x = W z + \mu + \sigma\varepsilon$.

        Args:
            n: number of datapoints.
            generator: random generator (default: the global one).
            return_z: also return the latent codes.

        Returns:
            `x` of shape `[n, D]` (and `z` of shape `[n, k]` if `return_z`).
        """
        if n < 1:
            raise ConfigError(f"n: expected >= 1, got {n}")
        z = torch.randn(n, self.k, generator=generator, dtype=DTYPE)
        eps = torch.randn(n, self.D, generator=generator, dtype=DTYPE)
        x = z @ self.W.T + self.mu + self.sigma * eps
        return (x, z) if return_z else x

    def marginal(self) -> MultivariateNormal:
        r"""$p(x) = \mathcal N(\mu, W W^\top + \sigma^2 I_D)$."""
        cov = self.W @ self.W.T + self.sigma**2 * torch.eye(self.D, dtype=DTYPE)
        return MultivariateNormal(self.mu, covariance_matrix=cov)

    def log_marginal(self, x: Tensor) -> Tensor:
        r"""$\log p(x_n) = \log \mathcal N(x_n; \mu, W W^\top + \sigma^2 I)$ per datapoint, `[N]`."""
        return self.marginal().log_prob(self.check_x(x))

    def posterior_precision_factor(self) -> Tensor:
        r"""$M = W^\top W + \sigma^2 I_k$ (`[k, k]`); the posterior precision is $M/\sigma^2$."""
        return self.W.T @ self.W + self.sigma**2 * torch.eye(self.k, dtype=DTYPE)

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""Exact posterior $p(z\mid x_n) = \mathcal N(M^{-1} W^\top (x_n - \mu),\, \sigma^2 M^{-1})$.

        Returns:
            `(mean [N, k], cov [k, k])` — the covariance does not depend on $x$.
        """
        x = self.check_x(x)
        m = self.posterior_precision_factor()
        mean = torch.linalg.solve(m, self.W.T @ (x - self.mu).T).T
        cov = self.sigma**2 * torch.linalg.inv(m)
        return mean, 0.5 * (cov + cov.T)

    def amortized_posterior(self) -> tuple[Tensor, Tensor, Tensor]:
        r"""The exact posterior written as a linear-Gaussian encoder $z \sim \mathcal N(xA + b, LL^\top)$.

        $A = W M^{-1}$ (`[D, k]`), $b = -\mu^\top W M^{-1}$ (`[k]`),
        $L = \operatorname{chol}(\sigma^2 M^{-1})$ (`[k, k]`).
        """
        m = self.posterior_precision_factor()
        a = torch.linalg.solve(m, self.W.T).T
        b = -(self.mu @ a)
        cov = self.sigma**2 * torch.linalg.inv(m)
        return a, b, torch.linalg.cholesky(0.5 * (cov + cov.T))

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        r"""$\log p(x, z) = \log \mathcal N(x; Wz + \mu, \sigma^2 I) + \log \mathcal N(z; 0, I)$.

        Args:
            x: `[N, D]` data.
            z: `[..., N, k]` latent codes (leading sample dimensions broadcast).

        Returns:
            `[..., N]`.
        """
        x = self.check_x(x)
        lik = dist.Normal(z @ self.W.T + self.mu, self.sigma).to_event(1).log_prob(x)
        prior = dist.Normal(torch.zeros(self.k, dtype=DTYPE), 1.0).to_event(1).log_prob(z)
        return lik + prior

    def model(self, x: Tensor) -> None:
        """The Pyro model: sites `"z"` (latent) and `"x"` (observed) in `plate("data", N)`.

        ```python
        with pyro.plate("data", N):
            z = pyro.sample("z", Normal(0, 1).expand([k]).to_event(1))
            pyro.sample("x", Normal(z @ W.T + mu, sigma).to_event(1), obs=x)
        ```
        """
        x = self.check_x(x)
        zeros = torch.zeros(self.k, dtype=DTYPE)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(zeros, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.mu, self.sigma).to_event(1), obs=x)


# ----------------------------------------------------------------------------------------------
# Guides: all have plate("data", N) and a latent site "z".


def _mvn_site(x: Tensor, loc: Tensor, scale_tril: Tensor) -> None:
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=scale_tril))


def _lower_cholesky(name: str, scale_tril: Tensor, k: int) -> Tensor:
    t = torch.as_tensor(scale_tril, dtype=DTYPE)
    if t.shape[-2:] != (k, k):
        raise ConfigError(f"{name}: expected [..., {k}, {k}], got {tuple(t.shape)}")
    if not constraints.lower_cholesky.check(t).all():
        raise ConfigError(f"{name}: must be lower triangular with a positive diagonal")
    return t


def exact_guide(ppca: PPCA) -> Guide:
    r"""Guide $q(z\mid x) = p(z\mid x)$, the exact posterior (a MultivariateNormal).

    With it $\log p(x, z) - \log q(z\mid x) = \log p(x)$ for every $z$, so `Trace_ELBO` has
    zero variance and its loss is exactly $-\sum_n \log p(x_n)$.
    """

    def guide(x: Tensor) -> None:
        mean, cov = ppca.posterior(x)
        _mvn_site(x, mean, torch.linalg.cholesky(cov))

    return guide


def gaussian_guide(A: Tensor, b: Tensor, scale_tril: Tensor) -> Guide:
    r"""Linear-Gaussian amortized guide $q(z\mid x) = \mathcal N(x A + b,\; L L^\top)$.

    The exact pPCA posterior is in this family (see [`PPCA.amortized_posterior`][pyrovae.teaching.ppca.PPCA.amortized_posterior]).

    Args:
        A: `[D, k]` encoder matrix.
        b: `[k]` encoder offset.
        scale_tril: `[k, k]` lower-triangular $L$ with positive diagonal.
    """
    A = torch.as_tensor(A, dtype=DTYPE)
    b = torch.as_tensor(b, dtype=DTYPE)
    if A.ndim != 2 or b.shape != (A.shape[1],):
        raise ConfigError(
            f"A, b: expected [D, k] and [k], got {tuple(A.shape)} and {tuple(b.shape)}"
        )
    L = _lower_cholesky("scale_tril", scale_tril, A.shape[1])

    def guide(x: Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != A.shape[0]:
            raise DataError(f"x: expected shape [N, {A.shape[0]}], got {tuple(x.shape)}")
        _mvn_site(x, x.to(DTYPE) @ A + b, L)

    return guide


def diagonal_guide(
    scale: Tensor,
    A: Tensor | None = None,
    b: Tensor | None = None,
    loc_fn: Callable[[Tensor], Tensor] | None = None,
) -> Guide:
    r"""Mean-field guide $q(z\mid x) = \prod_j \mathcal N(z_j; \mathrm{loc}_j(x), s_j^2)$.

    The location is either linear, $\mathrm{loc}(x) = xA + b$, or any `loc_fn(x) -> [N, k]`.

    Args:
        scale: `[k]` (or `[N, k]`) positive standard deviations $s$.
        A: `[D, k]` encoder matrix (with `b`).
        b: `[k]` encoder offset (with `A`).
        loc_fn: alternative to `A, b`.
    """
    scale = torch.as_tensor(scale, dtype=DTYPE)
    if scale.ndim < 1 or not (scale > 0).all():
        raise ConfigError("scale: expected a vector of positive standard deviations")
    linear = A is not None or b is not None
    if (loc_fn is None and (A is None or b is None)) or (loc_fn is not None and linear):
        raise ConfigError("diagonal_guide: give either both A and b, or loc_fn (not both)")
    if loc_fn is None:
        A = torch.as_tensor(A, dtype=DTYPE)
        b = torch.as_tensor(b, dtype=DTYPE)
        if A.ndim != 2 or b.shape != (A.shape[1],) or scale.shape[-1] != A.shape[1]:
            raise ConfigError(
                f"A, b, scale: expected [D, k], [k], [k]; got {tuple(A.shape)}, "
                f"{tuple(b.shape)}, {tuple(scale.shape)}"
            )

    def guide(x: Tensor) -> None:
        loc = loc_fn(x) if loc_fn is not None else x.to(DTYPE) @ A + b
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return guide


def fixed_gaussian_guide(q_mean: Tensor, q_cov: Tensor) -> Guide:
    r"""Guide with a given Gaussian per datapoint, $q(z \mid x_n) = \mathcal N(m_n, S_n)$.

    Args:
        q_mean: `[N, k]` means $m_n$ (the guide must be called with the matching `N`).
        q_cov: `[k, k]` or `[N, k, k]` positive-definite covariances $S_n$.
    """
    q_mean = torch.as_tensor(q_mean, dtype=DTYPE)
    L = torch.linalg.cholesky(torch.as_tensor(q_cov, dtype=DTYPE))

    def guide(x: Tensor) -> None:
        if x.shape[0] != q_mean.shape[0]:
            raise DataError(f"x: expected {q_mean.shape[0]} datapoints, got {x.shape[0]}")
        _mvn_site(x, q_mean, L)

    return guide


def perturbed_posterior(
    ppca: PPCA, x: Tensor, shift: float | Tensor = 0.0, scale_factor: float = 1.0
) -> tuple[Tensor, Tensor]:
    r"""A deliberately wrong posterior: $\mathcal N(m_{\text{exact}} + \delta,\; c^2 \Sigma_{\text{exact}})$.

    Args:
        ppca: the model.
        x: `[N, D]` data.
        shift: $\delta$, a scalar or `[k]`/`[N, k]` tensor added to the exact mean.
        scale_factor: $c > 0$, multiplies the exact posterior standard deviations.

    Returns:
        `(mean [N, k], cov [k, k])`.
    """
    if not scale_factor > 0:
        raise ConfigError(f"scale_factor: expected > 0, got {scale_factor}")
    mean, cov = ppca.posterior(x)
    return mean + torch.as_tensor(shift, dtype=DTYPE), scale_factor**2 * cov


def perturbed_guide(ppca: PPCA, shift: float | Tensor = 0.0, scale_factor: float = 1.0) -> Guide:
    r"""Guide $q(z\mid x) = \mathcal N(m_{\text{exact}}(x) + \delta,\; c^2 \Sigma_{\text{exact}})$.

    Its $\mathrm{KL}(q\|p(z\mid x))$ is known exactly ([`exact_kl_to_posterior`][pyrovae.teaching.ppca.exact_kl_to_posterior] with
    [`perturbed_posterior`][pyrovae.teaching.ppca.perturbed_posterior]), so estimators of the ELBO, of the gap or of PSIS $\hat k$ can
    be tested at a controlled distance from the truth.

    Args:
        ppca: the model.
        shift: $\delta$, added to the posterior mean.
        scale_factor: $c > 0$, multiplies the posterior standard deviations.
    """
    if not scale_factor > 0:
        raise ConfigError(f"scale_factor: expected > 0, got {scale_factor}")

    def guide(x: Tensor) -> None:
        mean, cov = perturbed_posterior(ppca, x, shift, scale_factor)
        _mvn_site(x, mean, torch.linalg.cholesky(cov))

    return guide


def learnable_gaussian_guide(
    D: int,
    k: int,
    prefix: str = "q",
    init_A: Tensor | None = None,
    init_b: Tensor | None = None,
    init_scale_tril: Tensor | None = None,
) -> Guide:
    r"""Linear-Gaussian amortized guide $\mathcal N(xA + b, LL^\top)$ with Pyro params, for SVI.

    Registers `pyro.param(f"{prefix}_A")` (`[D, k]`), `f"{prefix}_b"` (`[k]`) and
    `f"{prefix}_scale_tril"` (`[k, k]`, constraint `lower_cholesky`). The defaults
    $A = 0$, $b = 0$, $L = I$ start the guide at the prior $\mathcal N(0, I)$.

    Args:
        D: data dimension.
        k: latent dimension.
        prefix: name prefix of the params.
        init_A: initial `A`.
        init_b: initial `b`.
        init_scale_tril: initial `L`.
    """
    a0 = torch.zeros(D, k, dtype=DTYPE) if init_A is None else torch.as_tensor(init_A, dtype=DTYPE)
    b0 = torch.zeros(k, dtype=DTYPE) if init_b is None else torch.as_tensor(init_b, dtype=DTYPE)
    l0 = torch.eye(k, dtype=DTYPE) if init_scale_tril is None else init_scale_tril
    l0 = _lower_cholesky("init_scale_tril", l0, k)
    if a0.shape != (D, k) or b0.shape != (k,):
        raise ConfigError(f"init_A, init_b: expected [{D}, {k}] and [{k}]")

    def guide(x: Tensor) -> None:
        A = pyro.param(f"{prefix}_A", a0.clone())
        b = pyro.param(f"{prefix}_b", b0.clone())
        L = pyro.param(f"{prefix}_scale_tril", l0.clone(), constraint=constraints.lower_cholesky)
        _mvn_site(x, x.to(DTYPE) @ A + b, L)

    return guide


# ----------------------------------------------------------------------------------------------
# Closed forms for a Gaussian q(z | x_n) = N(m_n, S_n).


def _q_dist(q_mean: Tensor, q_cov: Tensor, k: int) -> MultivariateNormal:
    q_mean = torch.as_tensor(q_mean, dtype=DTYPE)
    q_cov = torch.as_tensor(q_cov, dtype=DTYPE)
    if q_mean.shape[-1] != k or q_cov.shape[-2:] != (k, k):
        raise DataError(
            f"q_mean, q_cov: expected [N, {k}] and [..., {k}, {k}], "
            f"got {tuple(q_mean.shape)} and {tuple(q_cov.shape)}"
        )
    try:
        return MultivariateNormal(q_mean, covariance_matrix=q_cov)
    except (ValueError, RuntimeError) as e:
        raise DataError(f"q_cov: not a valid covariance matrix ({e})") from e


def exact_kl_to_posterior(q_mean: Tensor, q_cov: Tensor, ppca: PPCA, x: Tensor) -> Tensor:
    r"""$\mathrm{KL}(q(z\mid x_n)\,\|\,p(z\mid x_n))$ per datapoint, in closed form (`[N]`).

    $\mathrm{KL}(\mathcal N(m, S)\|\mathcal N(m', S')) = \tfrac12\big[\operatorname{tr}(S'^{-1}S)
    + (m'-m)^\top S'^{-1}(m'-m) - k + \log\frac{|S'|}{|S|}\big]$, computed by
    `torch.distributions.kl_divergence`.

    Args:
        q_mean: `[N, k]` means of $q$.
        q_cov: `[k, k]` or `[N, k, k]` covariances of $q$.
        ppca: the model.
        x: `[N, D]` data.
    """
    q = _q_dist(q_mean, q_cov, ppca.k)
    mean, cov = ppca.posterior(x)
    return kl_divergence(q, MultivariateNormal(mean, covariance_matrix=cov))


@dataclass(frozen=True)
class ELBOTerms:
    r"""The pieces of the ELBO of a Gaussian $q$, per datapoint (each `[N]`, nats)."""

    expected_loglik: Tensor
    r"""$\mathbb E_q[\log p(x\mid z)]$ (the negative reconstruction error)."""
    expected_logprior: Tensor
    r"""$\mathbb E_q[\log p(z)]$."""
    entropy: Tensor
    r"""$H[q] = -\mathbb E_q[\log q(z)]$."""

    @property
    def kl_to_prior(self) -> Tensor:
        r"""$\mathrm{KL}(q(z\mid x)\,\|\,p(z)) = -\mathbb E_q[\log p(z)] - H[q]$."""
        return -self.expected_logprior - self.entropy

    @property
    def elbo(self) -> Tensor:
        r"""$\mathbb E_q[\log p(x\mid z)] + \mathbb E_q[\log p(z)] + H[q]
        = \mathbb E_q[\log p(x\mid z)] - \mathrm{KL}(q\|p(z))$."""
        return self.expected_loglik + self.expected_logprior + self.entropy


def elbo_terms(q_mean: Tensor, q_cov: Tensor, ppca: PPCA, x: Tensor) -> ELBOTerms:
    r"""Analytic ELBO pieces for $q(z\mid x_n) = \mathcal N(m_n, S_n)$.

    * $\mathbb E_q[\log p(x\mid z)] = -\frac D2\log(2\pi\sigma^2)
      - \frac{1}{2\sigma^2}\big(\lVert x - \mu - Wm\rVert^2 + \operatorname{tr}(W^\top W S)\big)$
    * $\mathbb E_q[\log p(z)] = -\frac k2 \log 2\pi - \frac12(\lVert m\rVert^2 + \operatorname{tr} S)$
    * $H[q] = \frac k2(1 + \log 2\pi) + \frac12\log|S|$ (`MultivariateNormal.entropy`)

    Args:
        q_mean: `[N, k]` means of $q$.
        q_cov: `[k, k]` or `[N, k, k]` covariances of $q$.
        ppca: the model.
        x: `[N, D]` data.
    """
    x = ppca.check_x(x)
    q = _q_dist(q_mean, q_cov, ppca.k)
    m, S = q.loc, q.covariance_matrix
    s2, D, k = ppca.sigma**2, ppca.D, ppca.k
    resid = x - ppca.mu - m @ ppca.W.T
    tr_wws = torch.einsum("ij,...ji->...", ppca.W.T @ ppca.W, S)
    expected_loglik = -0.5 * D * math.log(2 * math.pi * s2) - (resid.pow(2).sum(-1) + tr_wws) / (
        2 * s2
    )
    trace_s = S.diagonal(dim1=-2, dim2=-1).sum(-1)
    expected_logprior = -0.5 * k * math.log(2 * math.pi) - 0.5 * (m.pow(2).sum(-1) + trace_s)
    return ELBOTerms(
        expected_loglik=expected_loglik,
        expected_logprior=expected_logprior.expand_as(expected_loglik),
        entropy=q.entropy().expand_as(expected_loglik),
    )


def elbo_closed_form(q_mean: Tensor, q_cov: Tensor, ppca: PPCA, x: Tensor) -> Tensor:
    r"""Analytic $\mathrm{ELBO}(q) = \mathbb E_q[\log p(x\mid z)] + \mathbb E_q[\log p(z)] + H[q]$, `[N]`.

    See [`elbo_terms`][pyrovae.teaching.ppca.elbo_terms]. For every Gaussian $q$:
    $\log p(x) = \mathrm{ELBO}(q) + \mathrm{KL}(q\|p(z\mid x))$.

    Args:
        q_mean: `[N, k]` means of $q$.
        q_cov: `[k, k]` or `[N, k, k]` covariances of $q$.
        ppca: the model.
        x: `[N, D]` data.
    """
    return elbo_terms(q_mean, q_cov, ppca, x).elbo
