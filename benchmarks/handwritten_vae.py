"""The reference for ``train_speed.py``: a VAE written by hand in plain PyTorch.

Same networks as the pyrovae benchmark config (784-400-50 MLPs with softplus, encoder output
split into ``loc`` and ``softplus(raw) + 1e-5``), Bernoulli likelihood through
``binary_cross_entropy_with_logits(reduction="sum")``, analytic Gaussian KL against N(0, I), the
reparameterization trick, one ``torch.optim.Adam`` over all parameters, and the same batching as
``pyrovae.train.Trainer`` (index slices of a shuffled permutation of the in-memory training tensor,
then ``torch.bernoulli`` with the trainer's generator for dynamic binarization).

The loss is the negative ELBO per datapoint (nats), i.e. the same scale as pyrovae's
``elbo.differentiable_loss(...) / N`` with the plate scaling N/B.

Run it alone for a sanity check::

    .venv/bin/python benchmarks/handwritten_vae.py --epochs 1
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn
from torch.nn import functional as F


class HandwrittenVAE(nn.Module):
    """Encoder ``D -> hidden -> 2L`` and decoder ``L -> hidden -> D``, softplus activations."""

    def __init__(self, data_dim: int = 784, hidden: int = 400, latent_dim: int = 50) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = nn.Sequential(nn.Linear(data_dim, hidden), nn.Softplus(), nn.Linear(hidden, 2 * latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.Softplus(), nn.Linear(hidden, data_dim))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Negative ELBO per datapoint: BCE(x, decoder(z)) + KL(N(mu, sigma^2) || N(0, I)), z reparameterized."""
        h = self.encoder(x)
        loc, scale = h[:, : self.latent_dim], F.softplus(h[:, self.latent_dim :]) + 1e-5
        z = loc + scale * torch.randn_like(loc)
        logits = self.decoder(z)
        rec = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        kl = 0.5 * (loc.pow(2) + scale.pow(2) - 1.0).sum() - scale.log().sum()
        return (rec + kl) / x.shape[0]


class HandwrittenTrainer:
    """The training loop pyrovae's ``Trainer`` is compared against, step for step."""

    def __init__(self, x_train: torch.Tensor, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
                 latent_dim: int = 50, hidden: int = 400, dynamic: bool = True) -> None:
        torch.manual_seed(seed)
        self.x_train, self.batch_size, self.dynamic = x_train, batch_size, dynamic
        self.n = x_train.shape[0]
        self.model = HandwrittenVAE(x_train.shape[1], hidden, latent_dim).to(x_train.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.gen = torch.Generator(device=x_train.device).manual_seed(seed)
        self.perm: torch.Tensor | None = None

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def new_epoch(self) -> None:
        self.perm = torch.randperm(self.n, generator=self.gen, device=self.x_train.device)

    def batch(self, s: int) -> torch.Tensor:
        b = self.batch_size
        x = self.x_train[self.perm[s * b : (s + 1) * b]]
        if self.dynamic:
            x = torch.bernoulli(x, generator=self.gen)
        return x

    def step(self, x: torch.Tensor) -> float | torch.Tensor:
        """One Adam step. On CPU the loss is read (a float) and a non-finite one skips the update;
        elsewhere the detached loss tensor is returned unread (no host synchronization), as
        pyrovae's trainer does."""
        self.opt.zero_grad(set_to_none=True)
        loss = self.model.loss(x)
        loss.backward()
        if self.x_train.device.type != "cpu":
            self.opt.step()
            return loss.detach()
        value = loss.item()
        if math.isfinite(value):
            self.opt.step()
        return value

    def run_steps(self, start: int, count: int) -> float:
        """Run ``count`` steps from batch index ``start`` of the current epoch; returns the mean loss."""
        total = 0.0
        for s in range(start, start + count):
            total += self.step(self.batch(s))
        return float(total) / max(count, 1)

    def run_epoch(self) -> float:
        self.new_epoch()
        return self.run_steps(0, self.steps_per_epoch)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="/work/shared/data/mnist")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    import pyrovae

    cfg = pyrovae.load_config({"data": {"dataset": "mnist", "root": a.root, "binarize": "dynamic"}})
    data = pyrovae.load_data(cfg.data, seed=0)
    tr = HandwrittenTrainer(data.x_train)
    for e in range(a.epochs):
        t = time.perf_counter()
        loss = tr.run_epoch()
        print(f"epoch {e + 1}: {time.perf_counter() - t:.2f} s, train -ELBO {loss:.2f} nats per datapoint")


if __name__ == "__main__":
    main()
