r"""Lesson 2 — a deep (nonlinear) autoencoder beats the linear one at the same code size.

Both autoencoders encode $x \in \mathbb R^D$ into a code $y \in \mathbb R^k$ and decode it,
trained on the same objective

$$\min_{\phi, \theta} \; \frac1N \sum_{n=1}^N \lVert x_n - g_\theta(f_\phi(x_n)) \rVert^2 .$$

* **linear**: $f_\phi(x) = W_1 x + b_1$, $g_\theta(y) = W_2 y + b_2$. Whatever the training, its
  reconstructions lie in a $k$-dimensional *affine subspace*, so its error is at least the PCA
  residual $\sum_{j>k}\lambda_j$ (Eckart & Young 1936; lesson 1).
* **deep**: $f_\phi$ and $g_\theta$ are multilayer perceptrons
  $x \to h_1 \to \dots \to y \to \dots \to \hat x$ with nonlinear activations. Its
  reconstructions lie on a $k$-dimensional *curved manifold*, which can follow the data far more
  closely (Hinton & Salakhutdinov 2006), so its error can fall *below* the PCA residual — the
  floor of every linear autoencoder.

Both networks are pyrovae's [`AutoEncoder`][pyrovae.AutoEncoder] (`model.kind = "ae"`,
`variant = "linear"` / `"deep"`) trained by [`pyrovae.fit`][pyrovae.fit] with the
`normal` likelihood, whose autoencoder loss is the squared error above.

References:
    C. Eckart, G. Young (1936), *The approximation of one matrix by another of lower rank*,
    Psychometrika 1.
    G. E. Hinton, R. R. Salakhutdinov (2006), *Reducing the dimensionality of data with neural
    networks*, Science 313.
    P. Baldi, K. Hornik (1989), *Neural networks and principal component analysis*, Neural
    Networks 2.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pyrovae.errors import ConfigError

__all__ = [
    "CodeSizeResult",
    "DeepVsLinearResult",
    "ae_config",
    "deep_vs_linear_lesson",
    "fit_quietly",
    "pca_test_error",
    "plot_deep_vs_linear",
    "preserved_rng",
]


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's global random states on exit.

    [`pyrovae.fit`][pyrovae.fit] reseeds all three (`pyro.set_rng_seed`); a lesson must not
    change its caller's random stream.
    """
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def fit_quietly(config: dict[str, Any], workdir: str | Path | None = None) -> Any:
    """Train a config with [`pyrovae.fit`][pyrovae.fit], without progress bars or figures.

    The run folder goes to `workdir` (kept) or to a temporary folder (deleted afterwards; the
    returned `Run` keeps its model and data in memory). The caller's global random states are
    preserved.

    Args:
        config: a config dict (`[data]`, `[model]`, `[train]`).
        workdir: folder for the run, or `None` for a temporary one.

    Returns:
        The [`Run`][pyrovae.runs.Run] (`run.model`, `run.data`, `run.metrics`).
    """
    import pyrovae

    with preserved_rng():
        if workdir is not None:
            return pyrovae.fit(config, Path(workdir), progress=False, figures=False)
        with tempfile.TemporaryDirectory(prefix="pyrovae-lesson-") as tmp:
            return pyrovae.fit(config, Path(tmp) / "run", progress=False, figures=False)


def ae_config(
    variant: str,
    code_size: int,
    hidden: Sequence[int] = (128, 64),
    epochs: int = 60,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    noise: float = 0.3,
    activation: str = "softplus",
) -> dict[str, Any]:
    """A digits config for an autoencoder of the given `variant` with squared-error loss.

    The encoder is an MLP `64 → hidden → code_size`, the decoder its mirror image
    `code_size → reversed(hidden) → 64` (`hidden = ()` gives single affine maps; the
    `linear` variant always uses single affine maps). The likelihood is `normal`, whose
    autoencoder loss is $\\lVert x - \\hat x \\rVert^2$ summed over pixels.
    """
    hidden = [int(h) for h in hidden]
    if any(h < 1 for h in hidden):
        raise ConfigError(f"hidden: expected positive layer sizes, got {hidden}")
    enc: dict[str, Any] = {"kind": "mlp", "hidden": hidden, "activation": activation}
    dec: dict[str, Any] = {"kind": "mlp", "hidden": hidden[::-1], "activation": activation}
    if not hidden:
        enc = dec = {"kind": "linear"}
    return {
        "data": {"dataset": "digits"},
        "model": {
            "kind": "ae",
            "variant": variant,
            "noise": noise,
            "latent_dim": code_size,
            "encoder": enc,
            "decoder": dec,
            "likelihood": {"kind": "normal"},
        },
        "train": {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "device": "cpu",
        },
    }


def pca_test_error(x_train: Tensor, x_test: Tensor, k: int) -> tuple[float, float, Tensor]:
    r"""PCA fitted on `x_train`: mean squared reconstruction error per image on each split.

    The rank-$k$ affine reconstruction $\hat x = \bar x + V_k V_k^\top (x - \bar x)$ with the top-$k$
    principal directions $V_k$ of the training data is the best any *linear* autoencoder can do
    on the training data.

    Returns:
        `(train error, test error, V_k [D, k])`.
    """
    from sklearn.decomposition import PCA

    pca = PCA(n_components=k, svd_solver="full").fit(x_train.double().numpy())

    def err(x: Tensor) -> float:
        xn = x.double().numpy()
        rec = pca.inverse_transform(pca.transform(xn))
        return float(((xn - rec) ** 2).sum(1).mean())

    return err(x_train), err(x_test), torch.as_tensor(pca.components_.T.copy())


@dataclass(frozen=True)
class CodeSizeResult:
    """Linear AE, deep AE and PCA at one code size $k$ (errors: mean squared error per test
    image, summed over the 64 pixels)."""

    k: int
    """Code size."""
    linear_error: float
    """Linear autoencoder, test split."""
    deep_error: float
    """Deep autoencoder, test split."""
    pca_error: float
    """PCA (fitted on the training split), test split: the floor of linear methods."""
    linear_train_error: float
    """Linear autoencoder, training split."""
    deep_train_error: float
    """Deep autoencoder, training split."""
    pca_train_error: float
    """PCA residual on the training split, $\\sum_{j>k}\\lambda_j$."""
    linear_params: int
    """Parameters of the linear autoencoder."""
    deep_params: int
    """Parameters of the deep autoencoder."""
    linear_seconds: float
    """Training time of the linear autoencoder."""
    deep_seconds: float
    """Training time of the deep autoencoder."""
    linear_recon: np.ndarray
    """`[n_examples, 64]` linear reconstructions of the example test images."""
    deep_recon: np.ndarray
    """Deep reconstructions of the same images."""
    pca_recon: np.ndarray
    """PCA reconstructions of the same images."""
    linear_codes: np.ndarray
    """`[N_test, k]` linear codes of the test split."""
    deep_codes: np.ndarray
    """`[N_test, k]` deep codes of the test split."""

    @property
    def deep_vs_linear(self) -> float:
        """deep error / linear error (< 1: the deep AE reconstructs better)."""
        return self.deep_error / self.linear_error

    @property
    def deep_vs_pca(self) -> float:
        """deep error / PCA error (< 1: better than any linear autoencoder)."""
        return self.deep_error / self.pca_error


@dataclass(frozen=True)
class DeepVsLinearResult:
    """Numbers and pictures of lesson 2."""

    results: tuple[CodeSizeResult, ...]
    """One entry per code size."""
    hidden: tuple[int, ...]
    """Hidden layer sizes of the deep encoder (the decoder mirrors them)."""
    epochs: int
    """Training epochs of each network."""
    lr: float
    """Adam learning rate."""
    n_train: int
    """Training images."""
    n_test: int
    """Test images."""
    examples: np.ndarray
    """`[n_examples, 64]` test images shown in the figure."""
    labels_test: np.ndarray
    """`[N_test]` digit labels of the test split."""

    @property
    def code_sizes(self) -> tuple[int, ...]:
        """The code sizes compared."""
        return tuple(r.k for r in self.results)

    def at(self, k: int) -> CodeSizeResult:
        """The result for code size `k`."""
        for r in self.results:
            if r.k == k:
                return r
        raise KeyError(f"code size {k} not in {self.code_sizes}")


def deep_vs_linear_lesson(
    code_sizes: Sequence[int] = (2, 8),
    hidden: Sequence[int] = (128, 64),
    epochs: int = 60,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    n_examples: int = 8,
    workdir: str | Path | None = None,
) -> DeepVsLinearResult:
    """Train a linear and a deep autoencoder at each code size on the digits; compare with PCA.

    Args:
        code_sizes: code sizes $k$ to compare.
        hidden: hidden layer sizes of the deep encoder (decoder mirrored).
        epochs: training epochs of each network (same budget for both).
        lr: Adam learning rate.
        batch_size: minibatch size.
        seed: seed of data split, initialisation and batches.
        n_examples: test images kept for the figure.
        workdir: keep the run folders under this folder (default: temporary).

    Returns:
        Test and training reconstruction errors, reconstructions and codes per code size.
    """
    sizes = tuple(int(k) for k in code_sizes)
    if not sizes or any(not 1 <= k < 64 for k in sizes):
        raise ConfigError(f"code_sizes: expected sizes in 1..63, got {list(code_sizes)}")
    if not hidden:
        raise ConfigError("hidden: the deep autoencoder needs at least one hidden layer")
    if n_examples < 1:
        raise ConfigError(f"n_examples: expected >= 1, got {n_examples}")
    results = []
    data = None
    for k in sizes:
        runs, secs = {}, {}
        for variant in ("linear", "deep"):
            cfg = ae_config(variant, k, hidden, epochs, lr, batch_size, seed)
            t = time.perf_counter()
            wd = None if workdir is None else Path(workdir) / f"{variant}_k{k}"
            runs[variant] = fit_quietly(cfg, wd)
            secs[variant] = time.perf_counter() - t
        data = runs["deep"].data
        x_tr, x_te = data.x_train, data.x_test
        pca_tr, pca_te, comps = pca_test_error(x_tr, x_te, k)
        ex = x_te[:n_examples]
        mean = x_tr.double().mean(0)
        with torch.no_grad():
            lin, deep = runs["linear"].model.eval(), runs["deep"].model.eval()

            def err(m: Any, x: Tensor) -> float:
                return float((x - m.reconstruct(x)).pow(2).sum(-1).mean())

            pca_recon = (ex.double() - mean) @ comps @ comps.T + mean
            results.append(
                CodeSizeResult(
                    k=k,
                    linear_error=err(lin, x_te),
                    deep_error=err(deep, x_te),
                    pca_error=pca_te,
                    linear_train_error=err(lin, x_tr),
                    deep_train_error=err(deep, x_tr),
                    pca_train_error=pca_tr,
                    linear_params=sum(p.numel() for p in lin.parameters()),
                    deep_params=sum(p.numel() for p in deep.parameters()),
                    linear_seconds=secs["linear"],
                    deep_seconds=secs["deep"],
                    linear_recon=lin.reconstruct(ex).numpy(),
                    deep_recon=deep.reconstruct(ex).numpy(),
                    pca_recon=pca_recon.float().numpy(),
                    linear_codes=lin.encode(x_te).numpy(),
                    deep_codes=deep.encode(x_te).numpy(),
                )
            )
    assert data is not None
    return DeepVsLinearResult(
        results=tuple(results),
        hidden=tuple(int(h) for h in hidden),
        epochs=epochs,
        lr=lr,
        n_train=int(data.x_train.shape[0]),
        n_test=int(data.x_test.shape[0]),
        examples=data.x_test[:n_examples].numpy(),
        labels_test=(
            data.y_test.numpy()
            if data.y_test is not None
            else np.zeros(data.x_test.shape[0], dtype=int)
        ),
    )


def _image_rows(subfig: Any, rows: list[tuple[str, np.ndarray]], title: str) -> None:
    n_ex = rows[0][1].shape[0]
    axes = subfig.subplots(len(rows), n_ex, squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        for c in range(n_ex):
            a = axes[r, c]
            a.imshow(imgs[c].reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            a.set_xticks([])
            a.set_yticks([])
            if c == 0:
                a.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    subfig.suptitle(title, fontsize=10)


def plot_deep_vs_linear(result: DeepVsLinearResult, path: str | Path) -> Path:
    """Figure of lesson 2: errors per code size, reconstructions, and the 2-D codes.

    Left: test reconstruction error of the linear AE, PCA and the deep AE per code size.
    Middle: test images and their reconstructions at the smallest code size.
    Right: the test codes of both autoencoders at the smallest code size (if it is 2),
    coloured by digit label.

    Args:
        result: output of [`deep_vs_linear_lesson`][pyrovae.teaching.deep_vs_linear.deep_vs_linear_lesson].
        path: where to write the image.

    Returns:
        The path written.
    """
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    small = min(result.results, key=lambda r: r.k)
    show_codes = small.k == 2
    fig = Figure(figsize=(15 if show_codes else 10.5, 4.2), layout="constrained")
    subs = fig.subfigures(
        1, 3 if show_codes else 2, width_ratios=[1, 1.4, 1.2][: 3 if show_codes else 2]
    )
    ax = subs[0].subplots()
    ks = np.arange(len(result.results))
    w = 0.27
    for i, (name, key, color) in enumerate(
        [
            ("linear AE", "linear_error", "tab:orange"),
            ("PCA (linear optimum)", "pca_error", "tab:gray"),
            ("deep AE", "deep_error", "tab:blue"),
        ]
    ):
        vals = [getattr(r, key) for r in result.results]
        bars = ax.bar(ks + (i - 1) * w, vals, w, label=name, color=color)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(ks, [f"k = {r.k}" for r in result.results])
    ax.set_ylabel("test ‖x − x̂‖² per image")
    ax.set_title("reconstruction error (test split)", fontsize=10)
    ax.legend(fontsize=8)
    _image_rows(
        subs[1],
        [
            ("data", result.examples),
            ("linear", small.linear_recon),
            ("PCA", small.pca_recon),
            ("deep", small.deep_recon),
        ],
        f"test images and reconstructions, code size k = {small.k}",
    )
    if show_codes:
        axes = subs[2].subplots(1, 2)
        for a, codes, name in zip(
            axes, (small.linear_codes, small.deep_codes), ("linear", "deep"), strict=True
        ):
            sc = a.scatter(
                codes[:, 0], codes[:, 1], c=result.labels_test, cmap="tab10", s=5, vmin=0, vmax=9
            )
            a.set_title(f"{name} AE codes", fontsize=9)
            a.set_xticks([])
            a.set_yticks([])
        subs[2].colorbar(sc, ax=axes, label="digit", shrink=0.8)
        subs[2].suptitle("2-D codes of the test images", fontsize=10)
    fig.savefig(path, dpi=110)
    return path
