r"""Lesson 1 — a linear autoencoder learns the principal subspace (PCA).

A linear autoencoder with code size $k$ encodes $y = U^\top (x - m)$ and decodes
$\hat x = U y + m$. Its objective

$$\min_{U, m} \; \frac{1}{N} \sum_{n=1}^{N} \lVert x_n - U U^\top (x_n - m) - m \rVert^2$$

has no spurious local minima, and every minimum has $U U^\top$ equal to the orthogonal
projection onto the span of the top-$k$ principal directions (Bourlard & Kamp 1988;
Baldi & Hornik 1989). The same holds for an *untied* linear autoencoder
$\hat x = W_2 (W_1 x + b_1) + b_2$: at the optimum $\operatorname{col}(W_2)$ is the principal
subspace (only the basis is arbitrary: $W_2 \mapsto W_2 G$, $W_1 \mapsto G^{-1} W_1$).

So the reconstruction error of either network converges to the PCA residual
$\sum_{j>k} \lambda_j$ (the discarded eigenvalues of the data covariance), and the
*principal angles* between the learned decoder subspace and PCA's go to zero.

References:
    H. Bourlard, Y. Kamp (1988), *Auto-association by multilayer perceptrons and singular
    value decomposition*, Biological Cybernetics 59.
    P. Baldi, K. Hornik (1989), *Neural networks and principal component analysis: learning
    from examples without local minima*, Neural Networks 2.
    A. Björck, G. Golub (1973), *Numerical methods for computing angles between linear
    subspaces*, Math. Comp. 27 (principal angles).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from pyrovae.errors import ConfigError, DataError

__all__ = [
    "LinearAEResult",
    "PCAFit",
    "TiedLinearAE",
    "UntiedLinearAE",
    "fit_full_batch",
    "linear_ae_lesson",
    "load_digits_matrix",
    "pca_fit",
    "plot_linear_ae",
    "principal_angles",
    "reconstruction_error",
]


def load_digits_matrix(dtype: torch.dtype = torch.float64) -> Tensor:
    """The 1,797 scikit-learn 8×8 digits as a `[1797, 64]` tensor with values in $[0, 1]$.

    Pixels are integers $0..16$ in the source, divided by 16 here.
    """
    from sklearn.datasets import load_digits

    return torch.as_tensor(load_digits().data / 16.0, dtype=dtype)


def _check_data(x: Tensor, k: int) -> None:
    if x.ndim != 2:
        raise DataError(f"x: expected a 2-D tensor [N, D], got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise DataError("x: contains NaN or inf")
    n, d = x.shape
    if not 1 <= k < d:
        raise ConfigError(f"k: expected 1 <= k < D = {d}, got {k}")
    if n <= k:
        raise DataError(f"x: need more datapoints than k = {k}, got N = {n}")


class TiedLinearAE(nn.Module):
    r"""Tied-weight linear autoencoder: $y = U^\top (x - m)$, $\hat x = U y + m$.

    Args:
        d: input dimension $D$.
        k: code size $k$.
        generator: random generator for the initialisation $U_{ij} \sim \mathcal N(0, 0.1^2)$.
        dtype: parameter dtype.
    """

    def __init__(
        self,
        d: int,
        k: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        self.U = nn.Parameter(0.1 * torch.randn(d, k, generator=generator, dtype=dtype))
        self.m = nn.Parameter(torch.zeros(d, dtype=dtype))

    def encode(self, x: Tensor) -> Tensor:
        r"""$y = U^\top (x - m)$, shape `[N, k]`."""
        return (x - self.m) @ self.U

    def decode(self, y: Tensor) -> Tensor:
        r"""$\hat x = U y + m$, shape `[N, D]`."""
        return y @ self.U.T + self.m

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction $\\hat x$ of `x`."""
        return self.decode(self.encode(x))

    @property
    def decoder_basis(self) -> Tensor:
        """Columns spanning the decoder subspace, `[D, k]`."""
        return self.U


class UntiedLinearAE(nn.Module):
    r"""Untied linear autoencoder: $y = W_1 x + b_1$, $\hat x = W_2 y + b_2$.

    Args:
        d: input dimension $D$.
        k: code size $k$.
        generator: random generator for the initialisation (entries $\mathcal N(0, 0.1^2)$).
        dtype: parameter dtype.
    """

    def __init__(
        self,
        d: int,
        k: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        self.W1 = nn.Parameter(0.1 * torch.randn(k, d, generator=generator, dtype=dtype))
        self.b1 = nn.Parameter(torch.zeros(k, dtype=dtype))
        self.W2 = nn.Parameter(0.1 * torch.randn(d, k, generator=generator, dtype=dtype))
        self.b2 = nn.Parameter(torch.zeros(d, dtype=dtype))

    def encode(self, x: Tensor) -> Tensor:
        """$y = W_1 x + b_1$, shape `[N, k]`."""
        return x @ self.W1.T + self.b1

    def decode(self, y: Tensor) -> Tensor:
        """$\\hat x = W_2 y + b_2$, shape `[N, D]`."""
        return y @ self.W2.T + self.b2

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction $\\hat x$ of `x`."""
        return self.decode(self.encode(x))

    @property
    def decoder_basis(self) -> Tensor:
        """Columns spanning the decoder subspace, `[D, k]`."""
        return self.W2


def reconstruction_error(x: Tensor, x_hat: Tensor) -> Tensor:
    r"""Mean squared reconstruction error per datapoint, $\frac1N \sum_n \lVert x_n - \hat x_n \rVert^2$.

    Summed over the $D$ coordinates, averaged over the $N$ datapoints (a scalar tensor).
    """
    if x.shape != x_hat.shape:
        raise DataError(f"x_hat: expected shape {tuple(x.shape)}, got {tuple(x_hat.shape)}")
    return (x - x_hat).pow(2).sum(-1).mean()


def fit_full_batch(
    module: nn.Module,
    loss_fn: Callable[[], Tensor],
    max_iter: int = 1000,
    tolerance_grad: float = 1e-10,
) -> int:
    """Minimise `loss_fn()` over `module`'s parameters with full-batch L-BFGS.

    Uses a strong-Wolfe line search (Nocedal & Wright 2006, Alg. 7.5), which converges to a
    minimum in a few hundred iterations for these quadratic-in-each-factor objectives.

    Args:
        module: the network whose parameters are optimised in place.
        loss_fn: closure computing the full-batch loss.
        max_iter: the most L-BFGS iterations.
        tolerance_grad: stop when the largest gradient entry is below this.

    Returns:
        The number of loss evaluations performed.
    """
    if max_iter < 1:
        raise ConfigError(f"max_iter: expected >= 1, got {max_iter}")
    opt = torch.optim.LBFGS(
        module.parameters(),
        lr=1.0,
        max_iter=max_iter,
        max_eval=2 * max_iter,
        tolerance_grad=tolerance_grad,
        tolerance_change=1e-16,
        history_size=50,
        line_search_fn="strong_wolfe",
    )
    evaluations = 0

    def closure() -> Tensor:
        nonlocal evaluations
        evaluations += 1
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
    return evaluations


@dataclass(frozen=True)
class PCAFit:
    """PCA of a data matrix: orthonormal top-$k$ directions, mean, and the residual."""

    components: Tensor
    """`[D, k]` orthonormal principal directions (columns)."""
    mean: Tensor
    """`[D]` data mean."""
    residual: float
    r"""Mean squared residual per datapoint, $\sum_{j>k} \lambda_j$ (population covariance)."""

    def reconstruct(self, x: Tensor) -> Tensor:
        r"""$\hat x = V V^\top (x - \bar x) + \bar x$."""
        return (x - self.mean) @ self.components @ self.components.T + self.mean


def pca_fit(x: Tensor, k: int) -> PCAFit:
    """Top-$k$ PCA of `x` with scikit-learn's `PCA` (full SVD).

    Args:
        x: data `[N, D]`.
        k: number of components.

    Returns:
        The principal directions, the mean and the residual error of the rank-$k$ reconstruction.
    """
    from sklearn.decomposition import PCA

    _check_data(x, k)
    pca = PCA(n_components=k, svd_solver="full").fit(x.numpy())
    comps = torch.as_tensor(pca.components_.T.copy(), dtype=x.dtype)
    mean = torch.as_tensor(pca.mean_, dtype=x.dtype)
    fit = PCAFit(components=comps, mean=mean, residual=0.0)
    residual = float(reconstruction_error(x, fit.reconstruct(x)))
    return PCAFit(components=comps, mean=mean, residual=residual)


def _orth(a: np.ndarray) -> np.ndarray:
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    rank = int((s > s.max() * max(a.shape) * np.finfo(a.dtype).eps).sum())
    return u[:, :rank]


def principal_angles(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> np.ndarray:
    r"""Principal angles (degrees, descending) between the column spaces of `a` and `b`.

    With orthonormal bases $Q_a, Q_b$ the cosines of the angles are the singular values of
    $Q_a^\top Q_b$ (Björck & Golub 1973). Uses `scipy.linalg.subspace_angles` when SciPy is
    installed; otherwise the sines are taken from the singular values of
    $(I - Q_a Q_a^\top) Q_b$, which is accurate for small angles (where $\arccos$ is not).

    Args:
        a: `[D, p]` matrix.
        b: `[D, q]` matrix.

    Returns:
        `min(p, q)` angles in degrees, largest first.
    """
    a = np.asarray(a.detach().cpu() if isinstance(a, Tensor) else a, dtype=np.float64)
    b = np.asarray(b.detach().cpu() if isinstance(b, Tensor) else b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise DataError(f"a, b: expected [D, p] and [D, q], got {a.shape} and {b.shape}")
    try:
        from scipy.linalg import subspace_angles
    except ImportError:  # pragma: no cover - scipy ships with scikit-learn
        return _principal_angles_svd(a, b)
    return np.degrees(subspace_angles(a, b))


def _principal_angles_svd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SVD fallback for [`principal_angles`][pyrovae.teaching.linear_ae.principal_angles] (degrees, descending)."""
    qa, qb = _orth(a), _orth(b)
    if qa.shape[1] < qb.shape[1]:
        qa, qb = qb, qa
    cos = np.linalg.svd(qa.T @ qb, compute_uv=False)
    sin = np.linalg.svd(qb - qa @ (qa.T @ qb), compute_uv=False)[::-1]
    angles = np.where(
        cos**2 < 0.5, np.arccos(np.clip(cos, -1.0, 1.0)), np.arcsin(np.clip(sin, 0, 1))
    )
    return np.degrees(np.sort(angles)[::-1])


@dataclass(frozen=True)
class LinearAEResult:
    """Numbers (and a few reconstructions) of lesson 1."""

    k: int
    """Code size."""
    n: int
    """Number of datapoints."""
    pca_residual: float
    """PCA's mean squared reconstruction error per datapoint."""
    tied_error: float
    """Tied linear AE's mean squared reconstruction error per datapoint."""
    untied_error: float
    """Untied linear AE's mean squared reconstruction error per datapoint."""
    tied_angles_deg: np.ndarray
    """Principal angles (degrees) between the tied decoder subspace and PCA's."""
    untied_angles_deg: np.ndarray
    """Principal angles (degrees) between the untied decoder subspace and PCA's."""
    tied_evaluations: int
    """L-BFGS loss evaluations used by the tied AE."""
    untied_evaluations: int
    """L-BFGS loss evaluations used by the untied AE."""
    examples: np.ndarray
    """`[n_examples, 64]` original images."""
    pca_recon: np.ndarray
    """Their PCA reconstructions."""
    tied_recon: np.ndarray
    """Their tied-AE reconstructions."""
    untied_recon: np.ndarray
    """Their untied-AE reconstructions."""

    @property
    def tied_max_angle_deg(self) -> float:
        """Largest principal angle of the tied AE, degrees."""
        return float(self.tied_angles_deg.max())

    @property
    def untied_max_angle_deg(self) -> float:
        """Largest principal angle of the untied AE, degrees."""
        return float(self.untied_angles_deg.max())

    @property
    def tied_rel_error(self) -> float:
        """(tied error − PCA residual) / PCA residual."""
        return (self.tied_error - self.pca_residual) / self.pca_residual

    @property
    def untied_rel_error(self) -> float:
        """(untied error − PCA residual) / PCA residual."""
        return (self.untied_error - self.pca_residual) / self.pca_residual


def linear_ae_lesson(
    k: int = 8,
    seed: int = 0,
    max_iter: int = 1000,
    n_examples: int = 6,
    x: Tensor | None = None,
) -> LinearAEResult:
    """Train tied and untied linear autoencoders and compare them with PCA.

    Args:
        k: code size.
        seed: seed of the random initialisations.
        max_iter: the most L-BFGS iterations per network.
        n_examples: how many reconstructions to keep for the figure.
        x: data `[N, D]` (float64 recommended); default: the scikit-learn digits.

    Returns:
        Reconstruction errors, principal angles and example reconstructions.
    """
    x = load_digits_matrix() if x is None else x
    _check_data(x, k)
    if n_examples < 0:
        raise ConfigError(f"n_examples: expected >= 0, got {n_examples}")
    pca = pca_fit(x, k)
    gen = torch.Generator().manual_seed(seed)
    d = x.shape[1]
    tied = TiedLinearAE(d, k, generator=gen, dtype=x.dtype)
    untied = UntiedLinearAE(d, k, generator=gen, dtype=x.dtype)
    ev_t = fit_full_batch(tied, lambda: reconstruction_error(x, tied(x)), max_iter)
    ev_u = fit_full_batch(untied, lambda: reconstruction_error(x, untied(x)), max_iter)
    with torch.no_grad():
        ex = x[:n_examples]
        return LinearAEResult(
            k=k,
            n=x.shape[0],
            pca_residual=pca.residual,
            tied_error=float(reconstruction_error(x, tied(x))),
            untied_error=float(reconstruction_error(x, untied(x))),
            tied_angles_deg=principal_angles(tied.decoder_basis, pca.components),
            untied_angles_deg=principal_angles(untied.decoder_basis, pca.components),
            tied_evaluations=ev_t,
            untied_evaluations=ev_u,
            examples=ex.numpy(),
            pca_recon=pca.reconstruct(ex).numpy(),
            tied_recon=tied(ex).numpy(),
            untied_recon=untied(ex).numpy(),
        )


def plot_linear_ae(result: LinearAEResult, path: str | Path) -> Path:
    """Figure of lesson 1: principal angles per network, and reconstructions.

    Left: the $k$ principal angles between each decoder subspace and PCA's (log scale).
    Right: rows = original, PCA, tied AE, untied AE.

    Args:
        result: output of [`linear_ae_lesson`][pyrovae.teaching.linear_ae.linear_ae_lesson].
        path: where to write the image (PNG/SVG by suffix).

    Returns:
        The path written.
    """
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[1, 1.3])
    ax = left.subplots()
    idx = np.arange(1, result.k + 1)
    floor = 1e-12
    ax.semilogy(idx, np.maximum(result.tied_angles_deg[::-1], floor), "o-", label="tied AE")
    ax.semilogy(idx, np.maximum(result.untied_angles_deg[::-1], floor), "s--", label="untied AE")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":", label="1° (claim)")
    ax.set_xlabel("principal angle index (smallest → largest)")
    ax.set_ylabel("angle to PCA subspace (degrees)")
    ax.set_title(f"decoder subspace vs PCA, k = {result.k}")
    ax.legend()
    rows = [
        ("data", result.examples),
        ("PCA", result.pca_recon),
        ("tied AE", result.tied_recon),
        ("untied AE", result.untied_recon),
    ]
    n_ex = result.examples.shape[0]
    axes = right.subplots(len(rows), max(n_ex, 1), squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        for c in range(n_ex):
            a = axes[r, c]
            a.imshow(imgs[c].reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            a.set_xticks([])
            a.set_yticks([])
            if c == 0:
                a.set_ylabel(name)
    right.suptitle("reconstructions")
    fig.savefig(path, dpi=110)
    return path
