"""Figures of a run: reconstructions, samples, latent scatter, loss curves (matplotlib, Agg).

Image grids use `torchvision.utils.make_grid`. Every function writes one PNG and returns its path.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

if TYPE_CHECKING:
    from pyrovae.runs import Run


def _is_image(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 and shape[0] in (1, 3)


def image_grid(
    x: torch.Tensor, shape: tuple[int, ...], path: Path, title: str, nrow: int = 8
) -> Path:
    """Save flattened images `x` (N, C*H*W) as a grid."""
    imgs = x.detach().cpu().float().clamp(0, 1).reshape(-1, *shape)
    grid = make_grid(imgs, nrow=nrow, padding=1, pad_value=1.0)
    fig, ax = plt.subplots(figsize=(6, 6 * grid.shape[1] / grid.shape[2] + 0.4))
    ax.imshow(
        grid.permute(1, 2, 0).numpy(),
        cmap="gray" if shape[0] == 1 else None,
        interpolation="nearest",
    )
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110)
        tmp.replace(path)
    except BaseException:  # disk full, permission denied: no half-written figure left
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


def reconstructions(model, x: torch.Tensor, shape, path: Path, n: int = 8) -> Path:
    """Top row: data; bottom row: reconstructions E[x | z = E_q z]."""
    with torch.no_grad():
        rec = model.reconstruct(x[:n])
    return image_grid(
        torch.cat([x[:n], rec]), shape, path, "data (top) / reconstruction (bottom)", nrow=n
    )


def latent_scatter(model, x: torch.Tensor, y: torch.Tensor | None, path: Path, title: str) -> Path:
    """Codes E_q[z|x] (or the AE's codes) in 2-D, coloured by label; PCA first if latent_dim > 2."""
    with torch.no_grad():
        z = model.encode(x).cpu()
    if z.shape[1] > 2:
        from sklearn.decomposition import PCA

        z = torch.as_tensor(PCA(2).fit_transform(z.numpy()))
        title += " (first 2 principal components)"
    elif z.shape[1] == 1:
        z = torch.cat([z, torch.zeros_like(z)], 1)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    sc = ax.scatter(
        z[:, 0], z[:, 1], c=None if y is None else y.cpu(), cmap="tab10", s=6, alpha=0.8
    )
    if y is not None:
        fig.colorbar(sc, ax=ax, label="label")
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def loss_curves(history: list[dict], path: Path, kind: str) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ep = [h["epoch"] for h in history]
    if kind != "ae":
        ax.plot(ep, [h["train_elbo"] for h in history], label="train ELBO (β-weighted)")
        if any(h["val_elbo"] is not None for h in history):  # None: no validation split
            ax.plot(ep, [h["val_elbo"] for h in history], label="validation ELBO")
        ax.set_ylabel("nats per datapoint")
    else:
        ax.plot(ep, [h["train_loss"] for h in history], label="train loss")
        if any(h["val_loss"] is not None for h in history):
            ax.plot(ep, [h["val_loss"] for h in history], label="validation loss")
        ax.set_ylabel("reconstruction loss per datapoint")
    ax.set_xlabel("epoch")
    ax.legend()
    return _save(fig, path)


def run_figures(run: Run, out: Path) -> list[Path]:
    """All figures for a finished run; image grids only for image-shaped data."""
    model, data = run.model, run.data
    device = next(model.parameters()).device
    x = data.x_test[:2000].to(device)
    y = data.y_test[:2000] if data.y_test is not None else None
    model.eval()
    kind = run.config.model.kind
    paths = [loss_curves(run.history, out / "loss_curves.png", kind)]
    if hasattr(model, "encode"):
        paths.append(
            latent_scatter(
                model, x, y, out / "latent_scatter.png", f"{kind.upper()} codes of test data"
            )
        )
    if _is_image(data.shape):
        if hasattr(model, "reconstruct"):
            paths.append(reconstructions(model, x, data.shape, out / "reconstructions.png"))
        gen = torch.Generator().manual_seed(0)
        if kind not in ("vae", "ae"):  # a plugin model: samples if it can draw them
            if callable(getattr(model, "sample", None)):
                try:
                    with torch.no_grad():
                        s = model.sample(64)
                except ValueError:  # a structured model that draws only given a condition
                    s = None
                if s is not None:
                    paths.append(image_grid(s, data.shape, out / "samples.png", f"{kind}: samples"))
        elif kind == "vae":
            s = model.sample(64)
            paths.append(image_grid(s, data.shape, out / "samples.png", "VAE: E[x|z], z ~ p(z)"))
        else:
            s = model.decode_prior_draws(64, gen)
            paths.append(
                image_grid(
                    s,
                    data.shape,
                    out / "prior_decodes.png",
                    "AE: decoder(z), z ~ N(0, I) — an AE has no prior, so these are not samples",
                )
            )
    model.train()
    return paths


def grid_size(n: int) -> int:
    return max(1, int(math.ceil(math.sqrt(n))))
