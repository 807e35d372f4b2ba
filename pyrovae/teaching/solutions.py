"""Exercises of the lesson notebooks: statements, reference answers and their checks.

Every lesson notebook (`docs/lessons/notebooks/`) ends with exercises. Each asks for a small
function; [`check`][pyrovae.teaching.solutions.check] runs it on random inputs and compares the
result with an *independent* computation (torch, scipy or scikit-learn; never the reference
answer itself), so the reference answers here are checked too.

    from pyrovae.teaching.solutions import check

    def kl_bits(p, q):
        ...  # your answer

    check("4.1", kl_bits)

In a notebook an exercise cell that still raises `NotImplementedError` is reported as not
attempted. With the environment variable `PYROVAE_CHECK_SOLUTIONS=1` (set by the test suite
when it executes the notebooks) such a cell checks the reference answer instead, and any
failing check raises.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["EXERCISES", "Exercise", "check", "reference"]


# ---------------------------------------------------------------------------------------------
# Reference answers (float64 tensors in, tensors or floats out)


def pca_residual(x: Tensor, k: int) -> float:
    """Sum of the discarded eigenvalues of the (biased) covariance of the rows of `x`."""
    xc = x - x.mean(0)
    eig = torch.linalg.eigvalsh(xc.T @ xc / x.shape[0]).flip(0)
    return float(eig[k:].sum())


def largest_principal_angle(a: Tensor, b: Tensor) -> float:
    """Largest principal angle, in degrees, between the column spaces of `a` and `b`."""
    qa, _ = torch.linalg.qr(a)
    qb, _ = torch.linalg.qr(b)
    s = torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
    return math.degrees(float(torch.arccos(s.min())))


def mlp_parameters(sizes: list[int]) -> int:
    """Weights and biases of a fully connected network with layer widths `sizes`."""
    return sum(m * n + n for m, n in zip(sizes[:-1], sizes[1:], strict=True))


def pca_test_error(x_train: Tensor, x_test: Tensor, k: int) -> float:
    """Mean ‖x − x̂‖² per test row of PCA with `k` components fitted on `x_train`."""
    mean = x_train.mean(0)
    _, _, vt = torch.linalg.svd(x_train - mean, full_matrices=False)
    u = vt[:k].T
    xc = x_test - mean
    return float(((xc - xc @ u @ u.T) ** 2).sum(1).mean())


def optimal_gains(eigenvalues: Tensor, sigma: float) -> Tensor:
    """Gains λᵢ/(λᵢ + σ²) of the optimal linear denoiser along the principal directions."""
    return eigenvalues / (eigenvalues + sigma**2)


def jacobian_error(w_enc: Tensor, w_dec: Tensor) -> float:
    """‖J − I‖_F / ‖I‖_F of the linear autoencoder x ↦ W_dec (W_enc x + b) + c."""
    d = w_dec.shape[0]
    eye = torch.eye(d, dtype=w_dec.dtype)
    return float(torch.linalg.norm(w_dec @ w_enc - eye) / math.sqrt(d))


def kl_bits(p: Tensor, q: Tensor) -> float:
    """KL(p ‖ q) of two categorical distributions, in bits."""
    return float((p * (p.log2() - q.log2())).sum())


def gaussian_kl(m1: float, s1: float, m2: float, s2: float) -> float:
    """KL(N(m1, s1²) ‖ N(m2, s2²)) in nats."""
    return math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5


def log_mean_exp(logw: Tensor) -> Tensor:
    """log( mean(exp(logw)) ) over the last axis, without overflow."""
    m = logw.max(-1, keepdim=True).values
    return (m + (logw - m).exp().mean(-1, keepdim=True).log()).squeeze(-1)


def effective_sample_size(logw: Tensor) -> Tensor:
    """(Σw)² / Σw² over the last axis, from log-weights."""
    w = (logw - logw.max(-1, keepdim=True).values).exp()
    return w.sum(-1) ** 2 / (w**2).sum(-1)


def mvn_kl(m0: Tensor, s0: Tensor, m1: Tensor, s1: Tensor) -> float:
    """KL(N(m0, S0) ‖ N(m1, S1)) for full covariance matrices, in nats."""
    k = m0.shape[0]
    s1_inv = torch.linalg.inv(s1)
    d = m1 - m0
    return float(
        0.5 * (torch.trace(s1_inv @ s0) + d @ s1_inv @ d - k + torch.logdet(s1) - torch.logdet(s0))
    )


def ppca_posterior(w: Tensor, mu: Tensor, sigma: float, x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and covariance of p(z | x) for pPCA x = Wz + μ + σε, z ~ N(0, I)."""
    k = w.shape[1]
    m = w.T @ w + sigma**2 * torch.eye(k, dtype=w.dtype)
    m_inv = torch.linalg.inv(m)
    return m_inv @ w.T @ (x - mu), sigma**2 * m_inv


def negative_elbo(squared_error: Tensor, kl: Tensor, sigma: float, d: int) -> Tensor:
    """−ELBO of a Gaussian-likelihood VAE from ‖x − x̂‖², KL and σ (one z per image)."""
    return squared_error / (2 * sigma**2) + kl + 0.5 * d * math.log(2 * math.pi * sigma**2)


def kl_to_standard_normal(mu: Tensor, log_var: Tensor) -> Tensor:
    """KL(N(μ, diag exp(log_var)) ‖ N(0, I)) per row."""
    return 0.5 * (mu**2 + log_var.exp() - 1 - log_var).sum(-1)


def enumerated_elbo(log_prior: Tensor, log_lik: Tensor, q_logits: Tensor) -> Tensor:
    """ELBO of a mixture with the assignment summed out: Σₙ Σₖ qₙₖ (log p(k) + log p(xₙ|k) − log qₙₖ)."""
    log_q = q_logits.log_softmax(-1)
    return (log_q.exp() * (log_prior + log_lik - log_q)).sum()


def score_function_gradient(logits: Tensor, f: Tensor) -> Tensor:
    """E_q[f(c) ∇θ log q(c)] for q = Cat(softmax(θ)): qₖ (fₖ − Σⱼ qⱼ fⱼ)."""
    q = logits.softmax(-1)
    return q * (f - (q * f).sum(-1, keepdim=True))


def diagonal_gaussian_entropy(sigma: Tensor) -> Tensor:
    """Entropy of N(μ, diag σ²) per row: Σⱼ log σⱼ + d/2 · log(2πe)."""
    return sigma.log().sum(-1) + 0.5 * sigma.shape[-1] * math.log(2 * math.pi * math.e)


def max_normalized_weight(logw: Tensor) -> Tensor:
    """max_s w_s / Σ_t w_t over the last axis, from log-weights."""
    return (logw.max(-1).values - logw.logsumexp(-1)).exp()


# ---------------------------------------------------------------------------------------------
# Checks against independent computations


def _rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(got, want, what: str, rtol: float = 1e-6, atol: float = 1e-8) -> None:
    got = np.asarray(torch.as_tensor(got, dtype=torch.float64))
    want = np.asarray(torch.as_tensor(want, dtype=torch.float64))
    if got.shape != want.shape or not np.allclose(got, want, rtol=rtol, atol=atol):
        raise AssertionError(f"{what}: expected {want}, got {got}")


def _check_pca_residual(f: Callable) -> None:
    from sklearn.decomposition import PCA

    g = _rng()
    x = torch.randn(300, 10, generator=g, dtype=torch.float64) @ torch.randn(
        10, 10, generator=g, dtype=torch.float64
    )
    for k in (1, 4, 9):
        pca = PCA(k).fit(x.numpy())
        recon = pca.inverse_transform(pca.transform(x.numpy()))
        want = ((x.numpy() - recon) ** 2).sum(1).mean()
        _close(f(x, k), want, f"k = {k}")


def _check_principal_angle(f: Callable) -> None:
    from scipy.linalg import subspace_angles

    g = _rng()
    for k in (1, 3):
        a = torch.randn(8, k, generator=g, dtype=torch.float64)
        b = a @ torch.randn(k, k, generator=g, dtype=torch.float64)
        b = b + 0.3 * torch.randn(8, k, generator=g, dtype=torch.float64)
        want = np.degrees(subspace_angles(a.numpy(), b.numpy()).max())
        _close(f(a, b), want, f"k = {k}", rtol=1e-5, atol=1e-5)
    _close(f(a, 2 * a), 0.0, "same subspace", atol=1e-4)


def _check_mlp_parameters(f: Callable) -> None:
    for sizes in ([64, 128, 64, 2], [64, 2], [3, 5, 7, 5, 3]):
        net = torch.nn.Sequential(
            *[torch.nn.Linear(m, n) for m, n in zip(sizes[:-1], sizes[1:], strict=True)]
        )
        _close(f(sizes), sum(p.numel() for p in net.parameters()), f"sizes {sizes}")


def _check_pca_test_error(f: Callable) -> None:
    from sklearn.decomposition import PCA

    g = _rng()
    mix = torch.randn(6, 6, generator=g, dtype=torch.float64)
    x_train = torch.randn(200, 6, generator=g, dtype=torch.float64) @ mix + 1.0
    x_test = torch.randn(50, 6, generator=g, dtype=torch.float64) @ mix + 1.0
    for k in (1, 3):
        pca = PCA(k).fit(x_train.numpy())
        recon = pca.inverse_transform(pca.transform(x_test.numpy()))
        want = ((x_test.numpy() - recon) ** 2).sum(1).mean()
        _close(f(x_train, x_test, k), want, f"k = {k}")


def _check_optimal_gains(f: Callable) -> None:
    g = _rng()
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    cov = a @ a.T
    sigma = 0.7
    lam, vec = torch.linalg.eigh(cov)
    # the optimal linear denoiser W = Σ (Σ + σ²I)⁻¹, seen along the eigenvectors of Σ
    w = cov @ torch.linalg.inv(cov + sigma**2 * torch.eye(5, dtype=cov.dtype))
    want = torch.diagonal(vec.T @ w @ vec)
    _close(f(lam, sigma), want, "gains")


def _check_jacobian_error(f: Callable) -> None:
    g = _rng()
    for k in (3, 12):
        w_enc = torch.randn(k, 6, generator=g, dtype=torch.float64)
        w_dec = torch.randn(6, k, generator=g, dtype=torch.float64)
        b = torch.randn(k, generator=g, dtype=torch.float64)
        x = torch.randn(6, generator=g, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(
            lambda v, w_enc=w_enc, w_dec=w_dec, b=b: w_dec @ (w_enc @ v + b), x
        )
        eye = torch.eye(6, dtype=jac.dtype)
        _close(f(w_enc, w_dec), torch.linalg.norm(jac - eye) / torch.linalg.norm(eye), f"k = {k}")


def _check_kl_bits(f: Callable) -> None:
    from torch.distributions import Categorical, kl_divergence

    g = _rng()
    for n in (2, 5):
        p, q = torch.rand(2, n, generator=g, dtype=torch.float64).add(0.1).unbind(0)
        p, q = p / p.sum(), q / q.sum()
        want = kl_divergence(Categorical(p), Categorical(q)) / math.log(2)
        _close(f(p, q), want, f"{n} outcomes")


def _check_gaussian_kl(f: Callable) -> None:
    from torch.distributions import Normal, kl_divergence

    for m1, s1, m2, s2 in ((0.0, 1.0, 1.0, 2.0), (2.0, 0.5, -1.0, 0.3), (1.0, 1.0, 1.0, 1.0)):
        want = kl_divergence(Normal(m1, s1), Normal(m2, s2))
        _close(f(m1, s1, m2, s2), want, f"N({m1}, {s1}²) ‖ N({m2}, {s2}²)")


def _check_log_mean_exp(f: Callable) -> None:
    g = _rng()
    logw = torch.randn(4, 100, generator=g, dtype=torch.float64) * 3
    want = torch.logsumexp(logw, -1) - math.log(100)
    _close(f(logw), want, "log-weights")
    _close(f(logw - 2000.0), want - 2000.0, "log-weights around −2000 (underflow)")
    _close(f(logw + 2000.0), want + 2000.0, "log-weights around +2000 (overflow)")


def _check_ess(f: Callable) -> None:
    g = _rng()
    logw = torch.randn(3, 50, generator=g, dtype=torch.float64) * 2
    w = logw.exp()
    want = w.sum(-1) ** 2 / (w**2).sum(-1)
    _close(f(logw), want, "weights")
    _close(f(logw - 1000.0), want, "log-weights around −1000")
    _close(f(torch.zeros(2, 7, dtype=torch.float64)), [7.0, 7.0], "equal weights")


def _check_mvn_kl(f: Callable) -> None:
    from torch.distributions import MultivariateNormal, kl_divergence

    g = _rng()
    for k in (1, 3):
        a, b = torch.randn(2, k, k, generator=g, dtype=torch.float64).unbind(0)
        s0 = a @ a.T + 0.5 * torch.eye(k, dtype=a.dtype)
        s1 = b @ b.T + 0.5 * torch.eye(k, dtype=a.dtype)
        m0, m1 = torch.randn(2, k, generator=g, dtype=torch.float64).unbind(0)
        want = kl_divergence(MultivariateNormal(m0, s0), MultivariateNormal(m1, s1))
        _close(f(m0, s0, m1, s1), want, f"k = {k}")


def _check_ppca_posterior(f: Callable) -> None:
    g = _rng()
    d, k, sigma = 5, 2, 0.4
    w = torch.randn(d, k, generator=g, dtype=torch.float64)
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(d, generator=g, dtype=torch.float64)
    # condition the joint Gaussian of (z, x) on x (Schur complement)
    s_zx = w.T
    s_xx = w @ w.T + sigma**2 * torch.eye(d, dtype=w.dtype)
    gain = s_zx @ torch.linalg.inv(s_xx)
    mean, cov = f(w, mu, sigma, x)
    _close(mean, gain @ (x - mu), "posterior mean")
    _close(cov, torch.eye(k, dtype=w.dtype) - gain @ s_zx.T, "posterior covariance")


def _check_negative_elbo(f: Callable) -> None:
    from torch.distributions import Normal

    g = _rng()
    d, sigma = 64, 0.3
    x, x_hat = torch.rand(2, 10, d, generator=g, dtype=torch.float64).unbind(0)
    kl = torch.rand(10, generator=g, dtype=torch.float64)
    want = -Normal(x_hat, sigma).log_prob(x).sum(-1) + kl
    _close(f(((x - x_hat) ** 2).sum(-1), kl, sigma, d), want, "−ELBO per image")


def _check_kl_std_normal(f: Callable) -> None:
    from torch.distributions import Normal, kl_divergence

    g = _rng()
    mu = torch.randn(6, 3, generator=g, dtype=torch.float64)
    log_var = torch.randn(6, 3, generator=g, dtype=torch.float64)
    want = kl_divergence(Normal(mu, (0.5 * log_var).exp()), Normal(0.0, 1.0)).sum(-1)
    _close(f(mu, log_var), want, "KL per row")


def _check_enumerated_elbo(f: Callable) -> None:
    import pyro
    import pyro.distributions as dist
    from pyro.infer import TraceEnum_ELBO
    from pyro.ops.indexing import Vindex

    def enumerated_loss(log_prior, log_lik, q_logits) -> float:
        n = log_lik.shape[0]

        def model():
            with pyro.plate("data", n):
                c = pyro.sample("c", dist.Categorical(logits=log_prior))
                pyro.factor("lik", Vindex(log_lik)[torch.arange(n), c])

        def guide():
            with pyro.plate("data", n):
                pyro.sample("c", dist.Categorical(logits=q_logits), infer={"enumerate": "parallel"})

        return TraceEnum_ELBO(max_plate_nesting=1).loss(model, guide)

    g = _rng()
    for n, k in ((5, 3), (20, 4)):
        log_prior = torch.randn(k, generator=g, dtype=torch.float64).log_softmax(-1)
        log_lik = -3 * torch.rand(n, k, generator=g, dtype=torch.float64)
        q_logits = torch.randn(n, k, generator=g, dtype=torch.float64)
        want = -enumerated_loss(log_prior, log_lik, q_logits)
        _close(f(log_prior, log_lik, q_logits), want, f"N = {n}, K = {k}", rtol=1e-6, atol=1e-6)


def _check_score_function(f: Callable) -> None:
    g = _rng()
    for k in (2, 3, 6):
        logits = torch.randn(k, generator=g, dtype=torch.float64, requires_grad=True)
        fk = torch.randn(k, generator=g, dtype=torch.float64)
        (want,) = torch.autograd.grad((logits.softmax(-1) * fk).sum(), logits)
        _close(f(logits.detach(), fk), want, f"K = {k}")


def _check_gaussian_entropy(f: Callable) -> None:
    from torch.distributions import Normal

    g = _rng()
    for d in (1, 2, 5):
        sigma = torch.rand(7, d, generator=g, dtype=torch.float64) * 3 + 0.05
        want = Normal(torch.zeros_like(sigma), sigma).entropy().sum(-1)
        _close(f(sigma), want, f"d = {d}")


def _check_max_weight(f: Callable) -> None:
    from scipy.special import softmax

    g = _rng()
    logw = torch.randn(6, 50, generator=g, dtype=torch.float64) * 4
    logw[0] += 1000.0  # would overflow exp
    logw[1] -= 1000.0  # would underflow exp
    want = softmax(logw.numpy(), axis=-1).max(-1)
    _close(f(logw), want, "max normalized weight per row")


# ---------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Exercise:
    """One exercise.

    Attributes:
        name: `"<lesson>.<number>"`, e.g. `"4.1"`.
        task: what the function must compute.
        reference: the reference answer.
        verify: raises `AssertionError` unless its argument answers the task.
    """

    name: str
    task: str
    reference: Callable
    verify: Callable[[Callable], None]


EXERCISES: dict[str, Exercise] = {
    e.name: e
    for e in (
        Exercise(
            "1.1", "pca_residual(x, k): PCA's mean squared error", pca_residual, _check_pca_residual
        ),
        Exercise(
            "1.2",
            "largest_principal_angle(a, b) in degrees",
            largest_principal_angle,
            _check_principal_angle,
        ),
        Exercise("2.1", "mlp_parameters(sizes)", mlp_parameters, _check_mlp_parameters),
        Exercise(
            "2.2", "pca_test_error(x_train, x_test, k)", pca_test_error, _check_pca_test_error
        ),
        Exercise("3.1", "optimal_gains(eigenvalues, sigma)", optimal_gains, _check_optimal_gains),
        Exercise("3.2", "jacobian_error(w_enc, w_dec)", jacobian_error, _check_jacobian_error),
        Exercise("4.1", "kl_bits(p, q)", kl_bits, _check_kl_bits),
        Exercise("4.2", "gaussian_kl(m1, s1, m2, s2)", gaussian_kl, _check_gaussian_kl),
        Exercise("5.1", "log_mean_exp(logw)", log_mean_exp, _check_log_mean_exp),
        Exercise("5.2", "effective_sample_size(logw)", effective_sample_size, _check_ess),
        Exercise("6.1", "mvn_kl(m0, s0, m1, s1)", mvn_kl, _check_mvn_kl),
        Exercise("6.2", "ppca_posterior(w, mu, sigma, x)", ppca_posterior, _check_ppca_posterior),
        Exercise(
            "7.1", "negative_elbo(squared_error, kl, sigma, d)", negative_elbo, _check_negative_elbo
        ),
        Exercise(
            "7.2", "kl_to_standard_normal(mu, log_var)", kl_to_standard_normal, _check_kl_std_normal
        ),
        Exercise(
            "8.1",
            "enumerated_elbo(log_prior, log_lik, q_logits)",
            enumerated_elbo,
            _check_enumerated_elbo,
        ),
        Exercise(
            "8.2",
            "score_function_gradient(logits, f)",
            score_function_gradient,
            _check_score_function,
        ),
        Exercise(
            "9.1",
            "diagonal_gaussian_entropy(sigma)",
            diagonal_gaussian_entropy,
            _check_gaussian_entropy,
        ),
        Exercise("9.2", "max_normalized_weight(logw)", max_normalized_weight, _check_max_weight),
    )
}


def reference(name: str) -> Callable:
    """The reference answer of exercise `name` (e.g. `"4.1"`)."""
    return EXERCISES[name].reference


def check(name: str, answer: Callable) -> bool:
    """Check an answer to exercise `name` and print the verdict.

    Args:
        name: the exercise, e.g. `"4.1"`.
        answer: your function.

    Returns:
        True when `answer` is right; False when it is wrong or raises `NotImplementedError`
        (not attempted yet).

    Raises:
        AssertionError: when `PYROVAE_CHECK_SOLUTIONS=1` and the answer checked (the reference
            one in place of an unattempted answer) is wrong.
    """
    ex = EXERCISES[name]
    strict = os.environ.get("PYROVAE_CHECK_SOLUTIONS") == "1"
    try:
        ex.verify(answer)
    except NotImplementedError:
        if not strict:
            print(f"exercise {name}: not attempted yet ({ex.task})")
            return False
        ex.verify(ex.reference)
        print(f"exercise {name}: reference answer checked")
        return True
    except AssertionError as err:
        if strict:
            raise
        print(f"exercise {name}: not yet right: {err}")
        return False
    print(f"exercise {name}: correct")
    return True
