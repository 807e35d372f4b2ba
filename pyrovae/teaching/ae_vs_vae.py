r"""Lesson 7 — the autoencoder and the VAE objectives, side by side.

**Autoencoder.** A deterministic code $y = f_\phi(x)$, reconstruction $\hat x = g_\theta(y)$:

$$\min_{\phi,\theta}\; \lVert x - \hat x \rVert^2 .$$

**VAE** with the normal likelihood $p_\theta(x\mid z) = \mathcal N(x;\, \mu_\theta(z),\, \sigma^2 I_D)$
(fixed $\sigma$), prior $p(z) = \mathcal N(0, I)$ and $q_\phi(z\mid x) = \mathcal N(m_\phi(x),
\operatorname{diag} s_\phi(x)^2)$. Since $-\log \mathcal N(x; \mu, \sigma^2 I) =
\frac{\lVert x - \mu\rVert^2}{2\sigma^2} + \frac D2 \log(2\pi\sigma^2)$, the negative ELBO is

$$-\mathrm{ELBO}(x) = \mathbb E_{q(z\mid x)}\!\left[\frac{\lVert x - \mu_\theta(z)\rVert^2}{2\sigma^2}\right]
 + \mathrm{KL}\big(q(z\mid x)\,\|\,p(z)\big) + \frac D2\log(2\pi\sigma^2),$$

$$\mathrm{KL}\big(q\,\|\,\mathcal N(0, I)\big) = \frac12 \sum_{j=1}^{d}\big(m_j^2 + s_j^2 - 1 - \log s_j^2\big).$$

Multiplying by $2\sigma^2$: the VAE minimises $\lVert x - \hat x\rVert^2 + 2\sigma^2\,\mathrm{KL}$ with
$\hat x = \mu_\theta(z)$ decoded from a *noisy* code $z \sim q(z\mid x)$ — the lecture's
"$\lVert x - \hat x\rVert^2 + \mathrm{KL}$" is the case $\sigma^2 = \frac12$. Two differences
follow:

1. the KL term pulls every $q(z\mid x)$ towards $\mathcal N(0, I)$, so the *aggregate posterior*
   $q(z) = \frac1N \sum_n q(z\mid x_n)$ has mean $\approx 0$ and covariance $\approx I$ — and decoding
   $z \sim \mathcal N(0, I)$ gives samples of the model;
2. the autoencoder's codes are unconstrained: any invertible reparametrisation of the code space
   leaves its loss unchanged, so $z \sim \mathcal N(0, I)$ pushed through its decoder is *not* a
   sample of anything.

The identity is checked to round-off with Pyro's own `TraceMeanField_ELBO` (analytic KL) and
`Trace_ELBO` (sampled KL) on a batch, replaying the same $z$.

References:
    D. P. Kingma, M. Welling (2014), *Auto-encoding variational Bayes*, ICLR (eq. 10, appendix B).
    C. Doersch (2016), *Tutorial on variational autoencoders*, arXiv:1606.05908, §2.
    M. D. Hoffman, M. J. Johnson (2016), *ELBO surgery*, NIPS workshop (the aggregate posterior).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch import Tensor
from torch.distributions import kl_divergence

from pyrovae import evaluate
from pyrovae.errors import ConfigError
from pyrovae.teaching.deep_vs_linear import fit_quietly

__all__ = [
    "AEvsVAEResult",
    "CodeStats",
    "IdentityCheck",
    "ae_vs_vae_lesson",
    "code_stats",
    "gaussian_elbo_identity",
    "moment_kl_to_standard_normal",
    "paired_configs",
    "plot_ae_vs_vae",
]


def paired_configs(
    latent_dim: int = 2,
    scale: float = 0.3,
    hidden: Sequence[int] = (128,),
    epochs: int = 50,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Configs of an autoencoder and a VAE with the same networks, data, optimiser and seed.

    Both use the `normal` likelihood: for the autoencoder its loss is
    $\\lVert x - \\hat x\\rVert^2$, for the VAE it is $\\mathcal N(x; \\mu(z), \\sigma^2 I)$ with
    $\\sigma$ = `scale`.

    Returns:
        `(ae_config, vae_config)`.
    """
    hidden = [int(h) for h in hidden]
    model = {
        "latent_dim": latent_dim,
        "encoder": {"kind": "mlp", "hidden": hidden},
        "decoder": {"kind": "mlp", "hidden": hidden[::-1]},
        "likelihood": {"kind": "normal", "scale": scale},
    }
    train = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "device": "cpu"}
    data = {"dataset": "digits"}
    ae = {"data": data, "model": {**model, "kind": "ae", "variant": "deep"}, "train": train}
    vae = {
        "data": data,
        "model": {**model, "kind": "vae", "prior": {"kind": "normal"}},
        "train": train,
    }
    return ae, vae


@dataclass(frozen=True)
class IdentityCheck:
    r"""$-\mathrm{ELBO} = \lVert x-\hat x\rVert^2/2\sigma^2 + \mathrm{KL} + \frac D2\log 2\pi\sigma^2$ on a batch."""

    n: int
    """Datapoints in the batch."""
    sigma: float
    """Likelihood scale."""
    const: float
    """$\\frac D2 \\log(2\\pi\\sigma^2)$."""
    squared_error: np.ndarray
    """`[n]` $\\lVert x - \\mu(z)\\rVert^2$ at the replayed $z \\sim q(z\\mid x)$."""
    kl: np.ndarray
    """`[n]` analytic $\\mathrm{KL}(q(z\\mid x)\\,\\|\\,\\mathcal N(0, I))$ (closed form above)."""
    neg_elbo_formula: np.ndarray
    """`[n]` $\\lVert x-\\hat x\\rVert^2/2\\sigma^2 + \\mathrm{KL}$ + const."""
    neg_elbo_pyro: np.ndarray
    """`[n]` $-\\log p(x\\mid z) + \\mathrm{KL}$ from the Pyro model trace and `kl_divergence`."""
    max_abs_diff: float
    """max over the batch of |formula − Pyro trace| (nats)."""
    mean_field_loss: float
    """`TraceMeanField_ELBO().loss` on the batch with the replayed $z$ (sum over datapoints)."""
    mean_field_diff: float
    """|that − Σ formula|."""
    trace_elbo_loss: float
    """`Trace_ELBO().loss` with the replayed $z$ (KL estimated by $\\log q(z|x) - \\log p(z)$)."""
    trace_elbo_diff: float
    """|that − Σ (squared error/2σ² + const + log q(z|x) − log p(z))|."""


def gaussian_elbo_identity(vae: Any, x: Tensor, seed: int = 0) -> IdentityCheck:
    r"""Check $-\mathrm{ELBO} = \lVert x - \hat x\rVert^2/(2\sigma^2) + \mathrm{KL} + \frac D2 \log 2\pi\sigma^2$.

    Draws one $z_n \sim q(z\mid x_n)$ per datapoint (a traced run of the guide), then with that
    same $z$:

    * the formula, from the decoder mean $\hat x = \mu_\theta(z)$ and the closed-form KL;
    * the Pyro model trace replayed on $z$: $-\log p(x\mid z)$ plus
      `torch.distributions.kl_divergence(q, p)`;
    * `pyro.infer.TraceMeanField_ELBO().loss` and `Trace_ELBO().loss` on the guide replayed
      with `poutine.replay` (their sums over the batch).

    Run it in float64 to see agreement to round-off. The VAE must have a `normal` likelihood
    with a fixed scale, a `normal` prior and a `normal` guide.
    """
    spec = vae.config
    if spec.likelihood.kind != "normal" or spec.likelihood.scale == "learned":
        raise ConfigError(
            "gaussian_elbo_identity needs model.likelihood = normal with a fixed scale"
        )
    if spec.prior.kind != "normal" or spec.guide.kind != "normal":
        raise ConfigError("gaussian_elbo_identity needs the normal prior and the normal guide")
    # the scale the likelihood really uses (a float32 buffer cast to the model's dtype: for
    # scale = 0.3 that is 0.30000001192..., which matters at 1e-6)
    sigmas = vae.likelihood.scale().detach()
    if not torch.all(sigmas == sigmas[0]):
        raise ConfigError("gaussian_elbo_identity needs one likelihood scale for all features")
    sigma = float(sigmas[0])
    d = x.shape[-1]
    const = 0.5 * d * math.log(2 * math.pi * sigma**2)
    with evaluate.evaluation_mode(vae), torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g = poutine.trace(vae.guide).get_trace(x)
        m = poutine.trace(poutine.replay(vae.model, trace=g)).get_trace(x)
        z = g.nodes["z"]["value"]
        q, p = g.nodes["z"]["fn"], m.nodes["z"]["fn"]
        loc, scale = vae.posterior.encode(x)
        kl = 0.5 * (loc.pow(2) + scale.pow(2) - 1 - 2 * scale.log()).sum(-1)
        sq = (x - vae.decode(z)).pow(2).sum(-1)
        formula = sq / (2 * sigma**2) + kl + const
        pyro_terms = -m.nodes["x"]["fn"].log_prob(x) + kl_divergence(q, p)
        replayed = poutine.replay(vae.guide, trace=g)
        mf = TraceMeanField_ELBO(max_plate_nesting=1).loss(vae.model, replayed, x)
        tr = Trace_ELBO(max_plate_nesting=1).loss(vae.model, replayed, x)
        mc_kl = q.log_prob(z) - p.log_prob(z)
        tr_formula = (sq / (2 * sigma**2) + const + mc_kl).sum()
    return IdentityCheck(
        n=int(x.shape[0]),
        sigma=sigma,
        const=const,
        squared_error=sq.numpy(),
        kl=kl.numpy(),
        neg_elbo_formula=formula.numpy(),
        neg_elbo_pyro=pyro_terms.numpy(),
        max_abs_diff=float((formula - pyro_terms).abs().max()),
        mean_field_loss=float(mf),
        mean_field_diff=abs(float(mf) - float(formula.sum())),
        trace_elbo_loss=float(tr),
        trace_elbo_diff=abs(float(tr) - float(tr_formula)),
    )


def moment_kl_to_standard_normal(mean: np.ndarray, var: np.ndarray) -> float:
    r"""$\mathrm{KL}(\mathcal N(m, \operatorname{diag} v)\,\|\,\mathcal N(0, I)) = \frac12\sum_j (v_j + m_j^2 - 1 - \log v_j)$.

    Applied to the mean and variance of a set of codes, it measures how far their
    moment-matched Gaussian is from the prior (0 iff mean 0 and variance 1).
    """
    mean, var = np.asarray(mean, dtype=float), np.asarray(var, dtype=float)
    return float(0.5 * (var + mean**2 - 1 - np.log(var)).sum())


@dataclass(frozen=True)
class CodeStats:
    """Mean and variance per latent coordinate of a set of codes, and their distance to $\\mathcal N(0, I)$."""

    mean: np.ndarray
    """`[d]` mean."""
    var: np.ndarray
    """`[d]` variance."""
    kl_to_prior: float
    """Moment-matched KL to $\\mathcal N(0, I)$ (nats)."""


def code_stats(net: Any, x: Tensor) -> CodeStats:
    r"""Moments of the codes of `x`.

    For a [`pyrovae.VAE`][pyrovae.VAE]: the aggregate posterior $q(z) = \frac1N\sum_n q(z\mid x_n)$,
    a mixture, with mean $\bar m = \frac1N\sum_n m(x_n)$ and variance
    $\frac1N\sum_n \big(s(x_n)^2 + (m(x_n) - \bar m)^2\big)$.
    For an [`AutoEncoder`][pyrovae.AutoEncoder]: the empirical moments of $f_\phi(x_n)$.
    """
    with torch.no_grad():
        if hasattr(net, "posterior"):
            loc, scale = net.posterior.encode(x)
            mean = loc.mean(0)
            var = (scale.pow(2) + (loc - mean).pow(2)).mean(0)
        else:
            codes = net.encode(x)
            mean, var = codes.mean(0), codes.var(0, unbiased=False)
    mean_np, var_np = mean.double().numpy(), var.double().numpy()
    return CodeStats(mean_np, var_np, moment_kl_to_standard_normal(mean_np, var_np))


@dataclass(frozen=True)
class AEvsVAEResult:
    """Numbers and pictures of lesson 7."""

    latent_dim: int
    """Code size $d$."""
    sigma: float
    """The VAE's likelihood scale."""
    epochs: int
    """Training epochs of each."""
    identity: IdentityCheck
    """The identity on a test batch (float64)."""
    ae_error: float
    """AE mean $\\lVert x-\\hat x\\rVert^2$ per test image."""
    vae_error: float
    """VAE mean $\\lVert x-\\hat x\\rVert^2$ per test image, $\\hat x = \\mu(E_q z)$."""
    vae_test_elbo: float
    """VAE test ELBO (nats per image)."""
    ae_codes: CodeStats
    """Moments of the AE's training codes."""
    vae_codes: CodeStats
    """Moments of the VAE's aggregate posterior over the training split."""
    examples: np.ndarray
    """Example test images."""
    ae_recon: np.ndarray
    """Their AE reconstructions."""
    vae_recon: np.ndarray
    """Their VAE reconstructions."""
    prior_z: np.ndarray
    """`[n_samples, d]` draws $z \\sim \\mathcal N(0, I)$."""
    ae_prior_decodes: np.ndarray
    """The AE decoder applied to them."""
    vae_samples: np.ndarray
    """The VAE decoder mean applied to them: samples of the model (means $E[x\\mid z]$)."""
    ae_test_codes: np.ndarray
    """`[N_test, d]` AE codes of the test split."""
    vae_test_codes: np.ndarray
    """`[N_test, d]` VAE posterior means of the test split."""
    labels_test: np.ndarray
    """Digit labels of the test split."""
    prior_mass_ae: float
    """Share of the AE's test codes inside the prior's 95% ball (the VAE's: see `prior_mass_vae`)."""
    prior_mass_vae: float
    """Share of the VAE's posterior means inside the prior's 95% ball."""


def _chi2_quantile(d: int, p: float = 0.95) -> float:
    from scipy.stats import chi2

    return float(chi2.ppf(p, d))


def ae_vs_vae_lesson(
    latent_dim: int = 2,
    scale: float = 0.3,
    hidden: Sequence[int] = (128,),
    epochs: int = 50,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    n_identity: int = 128,
    n_examples: int = 8,
    n_samples: int = 16,
    workdir: str | Path | None = None,
) -> AEvsVAEResult:
    """Train an autoencoder and a VAE with the same networks and compare objectives and codes.

    Args:
        latent_dim: code size $d$ (2 for the scatter plot).
        scale: the VAE's normal-likelihood $\\sigma$.
        hidden: hidden layers of encoder (decoder mirrored), shared by both.
        epochs: training epochs of each.
        lr: Adam learning rate.
        batch_size: minibatch size.
        seed: seed of training, of the identity's $z$ and of the prior draws.
        n_identity: test images in the identity check.
        n_examples: test images in the reconstruction figure.
        n_samples: prior draws decoded by both decoders.
        workdir: keep the run folders there (default: temporary).
    """
    if latent_dim < 1 or not scale > 0:
        raise ConfigError(f"latent_dim >= 1 and scale > 0 required, got {latent_dim}, {scale}")
    if min(n_identity, n_examples, n_samples) < 1:
        raise ConfigError("n_identity, n_examples, n_samples: expected >= 1")
    ae_cfg, vae_cfg = paired_configs(latent_dim, scale, hidden, epochs, lr, batch_size, seed)
    ae_run = fit_quietly(ae_cfg, None if workdir is None else Path(workdir) / "ae")
    vae_run = fit_quietly(vae_cfg, None if workdir is None else Path(workdir) / "vae")
    ae, vae = ae_run.model.eval(), vae_run.model.eval()
    data = vae_run.data
    x_tr, x_te = data.x_train, data.x_test
    vae64 = copy.deepcopy(vae).double()
    identity = gaussian_elbo_identity(vae64, x_te[:n_identity].double(), seed=seed)
    gen = torch.Generator().manual_seed(seed + 7)
    z = torch.randn(n_samples, latent_dim, generator=gen)
    r95 = _chi2_quantile(latent_dim)
    with torch.no_grad():
        ex = x_te[:n_examples]
        ae_codes_te = ae.encode(x_te)
        vae_codes_te = vae.encode(x_te)
        return AEvsVAEResult(
            latent_dim=latent_dim,
            sigma=scale,
            epochs=epochs,
            identity=identity,
            ae_error=float((x_te - ae.reconstruct(x_te)).pow(2).sum(-1).mean()),
            vae_error=float((x_te - vae.reconstruct(x_te)).pow(2).sum(-1).mean()),
            vae_test_elbo=float(vae_run.metrics["test_elbo"]),
            ae_codes=code_stats(ae, x_tr),
            vae_codes=code_stats(vae, x_tr),
            examples=ex.numpy(),
            ae_recon=ae.reconstruct(ex).numpy(),
            vae_recon=vae.reconstruct(ex).numpy(),
            prior_z=z.numpy(),
            ae_prior_decodes=ae.decode(z).numpy(),
            vae_samples=vae.decode(z).numpy(),
            ae_test_codes=ae_codes_te.numpy(),
            vae_test_codes=vae_codes_te.numpy(),
            labels_test=(
                data.y_test.numpy()
                if data.y_test is not None
                else np.zeros(x_te.shape[0], dtype=int)
            ),
            prior_mass_ae=float((ae_codes_te.pow(2).sum(-1) <= r95).float().mean()),
            prior_mass_vae=float((vae_codes_te.pow(2).sum(-1) <= r95).float().mean()),
        )


def plot_ae_vs_vae(result: AEvsVAEResult, path: str | Path) -> Path:
    """Figure of lesson 7: reconstructions, decodes of $z \\sim \\mathcal N(0, I)$, and the codes.

    Left: test images, AE and VAE reconstructions. Middle: the same prior draws through the VAE
    decoder (samples) and the AE decoder (not samples). Right: test codes of both (coloured by
    digit) with the prior's 1σ, 2σ circles.

    Args:
        result: output of [`ae_vs_vae_lesson`][pyrovae.teaching.ae_vs_vae.ae_vs_vae_lesson].
        path: where to write the image.

    Returns:
        The path written.
    """
    from matplotlib.figure import Figure

    from pyrovae.teaching.deep_vs_linear import _image_rows

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(16, 4.4), layout="constrained")
    left, mid, right = fig.subfigures(1, 3, width_ratios=[1.0, 1.1, 1.25])
    _image_rows(
        left,
        [("data", result.examples), ("AE", result.ae_recon), ("VAE", result.vae_recon)],
        f"reconstructions: AE {result.ae_error:.2f}, VAE {result.vae_error:.2f} (‖x − x̂‖²)",
    )
    n = result.prior_z.shape[0]
    half = (n + 1) // 2
    _image_rows(
        mid,
        [
            ("VAE", result.vae_samples[:half]),
            ("VAE ", result.vae_samples[half : 2 * half]),
            ("AE", result.ae_prior_decodes[:half]),
            ("AE ", result.ae_prior_decodes[half : 2 * half]),
        ]
        if n >= 2
        else [("VAE", result.vae_samples), ("AE", result.ae_prior_decodes)],
        "the same z ~ N(0, I) through each decoder (AE: not samples)",
    )
    axes = right.subplots(1, 2)
    theta = np.linspace(0, 2 * np.pi, 200)
    for a, codes, name in zip(
        axes,
        (result.ae_test_codes, result.vae_test_codes),
        ("AE codes f(x)", "VAE posterior means"),
        strict=True,
    ):
        c = codes if codes.shape[1] >= 2 else np.c_[codes, np.zeros(len(codes))]
        sc = a.scatter(c[:, 0], c[:, 1], c=result.labels_test, cmap="tab10", s=5, vmin=0, vmax=9)
        for r in (1, 2):
            a.plot(r * np.cos(theta), r * np.sin(theta), "k--" if r == 1 else "k:", lw=0.8)
        a.set_title(name, fontsize=9)
        a.set_aspect("equal", adjustable="datalim")
    axes[0].set_xlabel(f"moment KL to N(0,I): {result.ae_codes.kl_to_prior:.2f}", fontsize=8)
    axes[1].set_xlabel(f"moment KL to N(0,I): {result.vae_codes.kl_to_prior:.3f}", fontsize=8)
    right.colorbar(sc, ax=axes, label="digit", shrink=0.8)
    right.suptitle("codes of the test digits; circles: prior 1σ, 2σ", fontsize=10)
    fig.savefig(path, dpi=110)
    return path
