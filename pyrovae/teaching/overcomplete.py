r"""Lesson 3 — an over-complete autoencoder copies its input; a denoising one does not.

With a code larger than the input ($k > D$) the objective
$\min \frac1N\sum_n \lVert x_n - g(f(x_n)) \rVert^2$ has a trivial minimiser: the identity.
Even with no hidden layer, $\hat x = W_2 (W_1 x + b_1) + b_2$ with $W_2 W_1 = I_D$ (possible
since $\operatorname{rank} W_2 W_1$ can reach $D$ when $k \ge D$) reconstructs *every* input
perfectly — digits it never saw, and pure noise just as well. It has learned nothing about the
data. The sign is its Jacobian

$$J(x) = \frac{\partial \hat x}{\partial x} \approx I_D .$$

**Denoising** (Vincent et al. 2008) trains on corrupted inputs $\tilde x = x + \sigma\varepsilon$,
$\varepsilon \sim \mathcal N(0, I)$, against the clean target:
$\min \mathbb E\,\lVert x - g(f(\tilde x)) \rVert^2$. Copying now costs
$\sigma^2 D$ per datapoint, so the identity is no longer optimal. For a linear autoencoder the
expected loss is $\lVert x - A x - c\rVert^2 + \sigma^2 \lVert A \rVert_F^2$ (training with noise
is Tikhonov regularisation, Bishop 1995), minimised by

$$A^\star = C\,(C + \sigma^2 I)^{-1}, \qquad
\text{gain along the $i$-th principal direction} = \frac{\lambda_i}{\lambda_i + \sigma^2},$$

with $C$ the data covariance and $\lambda_i$ its eigenvalues: the denoising autoencoder keeps the
directions in which the data vary much more than the noise and shrinks the others towards the
mean — a Wiener filter. It has to know where the data are.

**What gradient training actually learns.** The over-complete network becomes the identity on the
directions the training data explore. A direction in which no training image varies (on the
digits: 3 border pixels are 0 in every training image) receives no gradient and keeps its random
initialisation. We therefore report $\lVert J - I\rVert_F / \lVert I\rVert_F$ over all pixels
*and* on the principal subspace holding 99% of the training variance.

References:
    P. Vincent, H. Larochelle, Y. Bengio, P.-A. Manzagol (2008), *Extracting and composing robust
    features with denoising autoencoders*, ICML.
    C. M. Bishop (1995), *Training with noise is equivalent to Tikhonov regularization*, Neural
    Computation 7.
    I. Goodfellow, Y. Bengio, A. Courville (2016), *Deep Learning*, §14.1–14.2, §14.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import jacrev

from pyrovae.errors import ConfigError
from pyrovae.teaching.deep_vs_linear import ae_config, fit_quietly

__all__ = [
    "AEReport",
    "OvercompleteResult",
    "denoising_gains",
    "jacobian",
    "overcomplete_lesson",
    "plot_overcomplete",
    "principal_directions",
    "relative_identity_error",
]


def jacobian(net: Any, x: Tensor) -> Tensor:
    r"""Jacobian $J(x) = \partial \hat x / \partial x$ of `net.reconstruct` at one point.

    Computed by reverse-mode autodiff (`torch.func.jacrev`).

    Args:
        net: anything with `reconstruct(x) -> x_hat` on flat vectors `[D]`.
        x: one input, shape `[D]`.

    Returns:
        `[D, D]` with `J[i, j] = d x_hat_i / d x_j`.
    """
    if x.ndim != 1:
        raise ConfigError(f"x: expected one input of shape [D], got {tuple(x.shape)}")
    return jacrev(net.reconstruct)(x).detach()


def relative_identity_error(J: Tensor, basis: Tensor | None = None) -> float:
    r"""$\lVert J - I \rVert_F / \lVert I \rVert_F = \lVert J - I\rVert_F/\sqrt D$, or on a subspace.

    With an orthonormal `basis` $V \in \mathbb R^{D\times k}$ the error of $J$ restricted to
    its span is $\lVert V^\top (J - I) V \rVert_F / \sqrt k$.
    """
    d = J.shape[-1]
    E = J.double() - torch.eye(d, dtype=torch.float64)
    if basis is None:
        return float(E.norm() / d**0.5)
    V = basis.double()
    return float((V.T @ E @ V).norm() / V.shape[1] ** 0.5)


def principal_directions(x: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of the population covariance of `x`."""
    C = torch.cov(x.double().T, correction=0)
    lam, V = torch.linalg.eigh(C)
    return lam.flip(0).clamp_min(0), V.flip(1)


def denoising_gains(eigenvalues: Tensor, sigma: float) -> Tensor:
    r"""Gains $\lambda_i / (\lambda_i + \sigma^2)$ of the optimal *linear* denoising autoencoder."""
    return eigenvalues / (eigenvalues + sigma**2)


@dataclass(frozen=True)
class AEReport:
    """How much one autoencoder copies its input (errors: mean $\\lVert x-\\hat x\\rVert^2$ per image)."""

    name: str
    """`overcomplete` or `denoising`."""
    test_error: float
    """On the test digits (never seen in training)."""
    train_error: float
    """On the training digits."""
    noise_error: float
    """On images of uniform noise $u \\sim U(0, 1)^{64}$."""
    jacobian_error: float
    """Mean over test points of $\\lVert J(x) - I\\rVert_F/\\lVert I\\rVert_F$ (all 64 pixels)."""
    jacobian_error_noise: float
    """The same at noise inputs."""
    jacobian_error_data: float
    """Mean over test points of the error on the principal subspace holding `variance_kept`."""
    gains: np.ndarray
    """$v_i^\\top J v_i$ per principal direction $v_i$ of the training data (at the first test point)."""
    jacobian_matrix: np.ndarray
    """`[64, 64]` Jacobian at the first test point."""
    test_recon: np.ndarray
    """Reconstructions of the example test images."""
    noise_recon: np.ndarray
    """Reconstructions of the example noise images."""
    params: int
    """Number of parameters."""

    def directions_copied(self, tol: float = 0.05) -> int:
        """How many principal directions pass with gain within `tol` of 1 (copied)."""
        return int((np.abs(self.gains - 1.0) < tol).sum())


@dataclass(frozen=True)
class OvercompleteResult:
    """Numbers and pictures of lesson 3."""

    input_dim: int
    """$D = 64$."""
    code_size: int
    """$k > D$."""
    hidden: tuple[int, ...]
    """Hidden layers of encoder (decoder mirrored); `()` = no hidden layer."""
    noise: float
    """$\\sigma$ of the denoising autoencoder's input noise."""
    epochs: int
    """Training epochs of each network."""
    overcomplete: AEReport
    """The plain over-complete autoencoder."""
    denoising: AEReport
    """The same network trained as a denoising autoencoder."""
    eigenvalues: np.ndarray
    """Eigenvalues of the training covariance, descending."""
    k_kept: int
    """Principal directions holding `variance_kept` of the variance."""
    variance_kept: float
    """Share of training variance defining the data subspace (0.99)."""
    constant_pixels: int
    """Pixels with the same value in every training image (they get no gradient)."""
    noise_energy: float
    """Mean $\\lVert u \\rVert^2$ of the noise images (the error of outputting 0)."""
    gains_closed_form: np.ndarray
    """$\\lambda_i/(\\lambda_i + \\sigma^2)$: the optimal linear denoiser's gains."""
    test_examples: np.ndarray
    """Example test images."""
    noise_examples: np.ndarray
    """Example noise images."""

    @property
    def gain_max_deviation(self) -> float:
        """Largest |trained − closed-form| denoising gain over the top `k_kept` directions."""
        k = self.k_kept
        return float(np.abs(self.denoising.gains[:k] - self.gains_closed_form[:k]).max())


def _report(
    name: str,
    net: Any,
    x_train: Tensor,
    x_test: Tensor,
    noise: Tensor,
    V: Tensor,
    k_kept: int,
    n_jacobian: int,
    n_examples: int,
) -> AEReport:
    net.eval()
    with torch.no_grad():

        def err(x: Tensor) -> float:
            return float((x - net.reconstruct(x)).pow(2).sum(-1).mean())

        test_error, train_error, noise_error = err(x_test), err(x_train), err(noise)
        test_recon = net.reconstruct(x_test[:n_examples]).numpy()
        noise_recon = net.reconstruct(noise[:n_examples]).numpy()
    js = [jacobian(net, x) for x in x_test[:n_jacobian]]
    jn = [jacobian(net, u) for u in noise[:n_jacobian]]
    Vk = V[:, :k_kept]
    J0 = js[0].double()
    return AEReport(
        name=name,
        test_error=test_error,
        train_error=train_error,
        noise_error=noise_error,
        jacobian_error=float(np.mean([relative_identity_error(J) for J in js])),
        jacobian_error_noise=float(np.mean([relative_identity_error(J) for J in jn])),
        jacobian_error_data=float(np.mean([relative_identity_error(J, Vk) for J in js])),
        gains=(V.T @ J0 @ V).diagonal().numpy(),
        jacobian_matrix=J0.numpy(),
        test_recon=test_recon,
        noise_recon=noise_recon,
        params=sum(p.numel() for p in net.parameters()),
    )


def overcomplete_lesson(
    code_size: int = 100,
    noise: float = 0.3,
    hidden: Sequence[int] = (),
    epochs: int = 100,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    n_noise: int = 500,
    n_jacobian: int = 4,
    variance_kept: float = 0.99,
    n_examples: int = 6,
    workdir: str | Path | None = None,
) -> OvercompleteResult:
    """Train an over-complete and a denoising autoencoder (same network) and compare how they copy.

    Both are pyrovae autoencoders (`variant = "overcomplete"` and `"denoising"`) with a code of
    `code_size` > 64 units and squared-error loss, trained by [`pyrovae.fit`][pyrovae.fit] on the
    digits' training split. They are then fed the test digits and images of uniform noise
    $U(0, 1)^{64}$.

    Args:
        code_size: code units, must exceed the 64 pixels.
        noise: standard deviation $\\sigma$ of the denoising autoencoder's Gaussian input noise.
        hidden: hidden layers of the encoder (decoder mirrored); `()` = single affine maps.
        epochs: training epochs per network.
        lr: Adam learning rate.
        batch_size: minibatch size.
        seed: seed of training and of the noise images.
        n_noise: number of noise images.
        n_jacobian: test (and noise) points at which the Jacobian is evaluated.
        variance_kept: share of training variance defining the data subspace.
        n_examples: images kept for the figure.
        workdir: keep the run folders there (default: temporary).
    """
    if code_size <= 64:
        raise ConfigError(f"code_size: expected > 64 (the input size), got {code_size}")
    if not noise > 0:
        raise ConfigError(f"noise: expected > 0, got {noise}")
    if not 0 < variance_kept <= 1:
        raise ConfigError(f"variance_kept: expected in (0, 1], got {variance_kept}")
    if min(n_noise, n_jacobian, n_examples) < 1:
        raise ConfigError("n_noise, n_jacobian, n_examples: expected >= 1")
    runs = {}
    for variant in ("overcomplete", "denoising"):
        cfg = ae_config(variant, code_size, hidden, epochs, lr, batch_size, seed, noise=noise)
        wd = None if workdir is None else Path(workdir) / variant
        runs[variant] = fit_quietly(cfg, wd)
    data = runs["overcomplete"].data
    x_train, x_test = data.x_train, data.x_test
    gen = torch.Generator().manual_seed(seed + 12345)
    u = torch.rand(n_noise, x_train.shape[1], generator=gen)
    lam, V = principal_directions(x_train)
    frac = lam.cumsum(0) / lam.sum()
    k_kept = min(int((frac < variance_kept - 1e-12).sum()) + 1, lam.numel())
    reports = {
        v: _report(v, runs[v].model, x_train, x_test, u, V, k_kept, n_jacobian, n_examples)
        for v in runs
    }
    return OvercompleteResult(
        input_dim=int(x_train.shape[1]),
        code_size=code_size,
        hidden=tuple(int(h) for h in hidden),
        noise=noise,
        epochs=epochs,
        overcomplete=reports["overcomplete"],
        denoising=reports["denoising"],
        eigenvalues=lam.numpy(),
        k_kept=k_kept,
        variance_kept=variance_kept,
        constant_pixels=int((x_train.max(0).values == x_train.min(0).values).sum()),
        noise_energy=float(u.pow(2).sum(-1).mean()),
        gains_closed_form=denoising_gains(lam, noise).numpy(),
        test_examples=x_test[:n_examples].numpy(),
        noise_examples=u[:n_examples].numpy(),
    )


def plot_overcomplete(result: OvercompleteResult, path: str | Path) -> Path:
    r"""Figure of lesson 3: reconstructions, Jacobians and gains per principal direction.

    Left: test digits and uniform noise, each with the over-complete and the denoising
    reconstruction. Middle: the two Jacobians $\partial\hat x/\partial x$ (64 × 64) at a test
    digit. Right: the gain $v_i^\top J v_i$ along each principal direction $v_i$ of the
    training data, with the optimal linear denoiser's $\lambda_i/(\lambda_i+\sigma^2)$.

    Args:
        result: output of [`overcomplete_lesson`][pyrovae.teaching.overcomplete.overcomplete_lesson].
        path: where to write the image.

    Returns:
        The path written.
    """
    from matplotlib.figure import Figure

    from pyrovae.teaching.deep_vs_linear import _image_rows

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    oc, dn = result.overcomplete, result.denoising
    fig = Figure(figsize=(16, 4.6), layout="constrained")
    left, mid, right = fig.subfigures(1, 3, width_ratios=[1.1, 1.5, 1.1])
    _image_rows(
        left,
        [
            ("test digit", result.test_examples),
            ("over-complete", oc.test_recon),
            ("denoising", dn.test_recon),
            ("noise", result.noise_examples),
            ("over-complete", oc.noise_recon),
            ("denoising", dn.noise_recon),
        ],
        "inputs never seen in training",
    )
    axes = mid.subplots(1, 2)
    for a, rep, title in zip(
        axes,
        (oc, dn),
        (
            f"over-complete: ‖J−I‖/‖I‖ = {oc.jacobian_error:.2f}",
            f"denoising σ={result.noise}: ‖J−I‖/‖I‖ = {dn.jacobian_error:.2f}",
        ),
        strict=True,
    ):
        im = a.imshow(rep.jacobian_matrix, cmap="RdBu_r", vmin=-1.2, vmax=1.2)
        a.set_title(title, fontsize=9)
        a.set_xlabel("input pixel j")
        a.set_ylabel("output pixel i")
    mid.colorbar(im, ax=axes, shrink=0.8, label="∂x̂ᵢ/∂xⱼ")
    mid.suptitle("Jacobian at a test digit", fontsize=10)
    ax = right.subplots()
    idx = np.arange(1, result.input_dim + 1)
    ax.axvspan(result.k_kept + 0.5, result.input_dim + 0.5, color="0.9")
    ax.text(
        result.k_kept + 1,
        1.12,
        f"last {100 * (1 - result.variance_kept):.0f}%\nof the variance",
        fontsize=7,
        va="top",
    )
    ax.plot(idx, oc.gains, "o", ms=3, label="over-complete")
    ax.plot(idx, dn.gains, "s", ms=3, label="denoising")
    ax.plot(idx, result.gains_closed_form, "k-", lw=1, label="λ/(λ+σ²), optimal linear denoiser")
    ax.axhline(1.0, color="grey", ls=":", lw=0.8)
    ax.set_ylim(-0.3, 1.2)
    ax.set_xlabel("principal direction i of the training digits (by variance)")
    ax.set_ylabel("gain vᵢᵀ J vᵢ")
    ax.set_title("what each network passes through", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    fig.savefig(path, dpi=110)
    return path
