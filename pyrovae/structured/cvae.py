r"""The conditional VAE (Sohn, Lee and Yan, NeurIPS 2015) and its deterministic baseline.

A CVAE models $x$ given a condition $c$, per datapoint (`CVAE.model`):

$$
z \sim p_\theta(z \mid c), \qquad x \sim p_\theta(x \mid z, c),
$$

with the guide $q_\phi(z \mid x, c)$; `Trace_ELBO` on the pair bounds the conditional
log-likelihood, $\mathrm{ELBO}(x \mid c) \le \log p(x \mid c)$. `model.condition` says what
$c$ is:

* `"label"`: the class $y$, one-hot; $p(z \mid c) = \mathcal N(0, I)$ and
  $p(x \mid z, y)$, $q(z \mid x, y)$ take $[\cdot, \mathrm{onehot}(y)]$. Every training point
  needs its label; evaluation is of $\log p(x \mid y)$ on the test labels.
* `"quadrants"` (the structured-output task of Sohn et al. and Pyro's CVAE example): $c$ is
  $g \in$ `model.given` quadrants of an image $x$ (1: bottom-left; 2: the left half; 3: all but
  the bottom-right), the rest set to -1; the model generates the missing pixels
  $x_{\bar g}$: $p(z \mid x_g) = \mathcal N(\mu_\theta(x_g), \sigma_\theta(x_g))$ (a learned
  prior net), $p(x_{\bar g} \mid z, x_g)$ the likelihood over the missing pixels only (the
  given ones are masked out of the observation site), $q(z \mid x_g, x)$. One model serves
  every $g$: the points of a batch take $g$ = `given[i % len(given)]` by position, so each
  training point sees every $g$ over the shuffled epochs, and model and guide agree on it.
  `metrics` reports the conditional negative log-likelihood
  $-\log p(x_{\bar g} \mid x_g)$ of the test images for each $g$, as an IWAE bound
  (`conditional_nll_samples` samples) and as the single-sample negative ELBO (what Pyro's
  example tabulates).

`QuadrantBaseline` (`kind = "cvae_baseline"`) is that example's deterministic baseline: a
network from the given quadrants to the missing pixels' Bernoulli means,
$p(x_{\bar g} \mid x_g) = \prod_d \mathrm{Bern}(x_d; \sigma(f_\theta(x_g))_d)$ — a Pyro program
with no latent site, so its ELBO is its exact log-likelihood and it trains through the same
loss.
"""

from __future__ import annotations

import itertools
import math
from functools import partial

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import one_hot, softplus

from pyrovae.errors import ConfigError
from pyrovae.evaluate import elbo, log_likelihood
from pyrovae.likelihoods import build_likelihood
from pyrovae.model import latent_weight
from pyrovae.networks import Frozen, build_network, forward_concat
from pyrovae.structured import register
from pyrovae.structured.m2 import check_mlp

_ids = itertools.count()
#: importance samples per test point for `metrics`' conditional NLL
CONDITIONAL_NLL_SAMPLES = 32
#: the value of the pixels that are not given (as in Pyro's CVAE example)
HIDDEN = -1.0


def quadrant_mask(shape: tuple[int, ...], given: int, device=None) -> torch.Tensor:
    """Boolean `(D,)` mask of the given pixels of an image of `shape` `(C, H, W)`: 1 given
    quadrant = bottom-left, 2 = the left half, 3 = all but the bottom-right (Pyro's CVAE example,
    `MaskImages`: the bottom-left, then the left half, then the left half and the top half)."""
    c, h, w = shape
    m = torch.zeros(c, h, w, dtype=torch.bool, device=device)
    m[:, h // 2 :, : w // 2] = True
    if given >= 2:
        m[:, :, : w // 2] = True
    if given >= 3:
        m[:, : h // 2, :] = True
    return m.flatten()


class _Quadrants(nn.Module):
    """What the quadrant CVAE and its baseline share: the given-quadrant masks per point."""

    uses_labels = False
    conditions_on_labels = False
    log_likelihood_of = "log p(x_missing | x_given), the given-quadrant counts by position"

    def _setup(self, model_config, data_shape: tuple[int, ...], kind: str) -> None:
        if model_config.condition != "quadrants":
            raise ConfigError(
                f'model.condition: model.kind = {kind!r} takes "quadrants" here; got '
                f"{model_config.condition!r}"
            )
        if len(data_shape) != 3 or data_shape[1] < 2 or data_shape[2] < 2:
            raise ConfigError(
                f'model.condition = "quadrants" needs image data (C, H, W) with H, W >= 2; got '
                f"points of shape {tuple(data_shape)}"
            )
        self.given = tuple(model_config.given or (1, 2, 3))
        self.register_buffer(
            "masks", torch.stack([quadrant_mask(data_shape, g) for g in (1, 2, 3)]), persistent=False
        )

    def given_mask(self, x: torch.Tensor, given: int | None) -> torch.Tensor:
        """`(B, D)` given-pixel mask: `given` quadrants for all, or `self.given` by position."""
        if given is not None:
            return self.masks[given - 1].expand(x.shape[0], -1)
        counts = torch.tensor(self.given, device=x.device)
        idx = counts[torch.arange(x.shape[0], device=x.device) % len(self.given)] - 1
        return self.masks[idx]

    def _plate(self, x: torch.Tensor, n_data: int | None) -> pyro.plate:
        b = x.shape[0]
        if n_data is None or n_data == b:
            return pyro.plate("data", b, device=x.device)
        return pyro.plate("data", n_data, subsample=torch.arange(b, device=x.device))

    def _missing_site(self, raw: torch.Tensor, x: torch.Tensor, gmask: torch.Tensor) -> None:
        """The observation site over the missing pixels only (the given ones masked out)."""
        d = self.likelihood(raw.reshape(*raw.shape[:-1], self.likelihood.params_per_feature, self.data_dim))
        pyro.sample("x", d.base_dist.mask(~gmask).to_event(1), obs=x)

    @torch.no_grad()
    def metrics(
        self, x: torch.Tensor, y: torch.Tensor | None = None, samples: int = CONDITIONAL_NLL_SAMPLES
    ) -> dict:
        """Conditional NLL of the missing pixels for each number of given quadrants the model was
        trained for (`model.given`; nats per image, IWAE bound with `samples` importance samples,
        and the negative ELBO)."""
        out: dict = {"conditional_nll": {}, "conditional_nll_elbo": {}}
        for g in self.given:
            m, q = partial(self.model, given=g), partial(self.guide, given=g)
            ll = log_likelihood(m, q, x, samples)
            out["conditional_nll"][str(g)] = float(-ll.mean())
            out["conditional_nll_elbo"][str(g)] = float(-elbo(m, q, x, batch_size=1024).mean())
        out["conditional_nll_note"] = (
            f"-log p(x_missing | x_given) per test image, nats, for {list(self.given)} given quadrants: IWAE "
            f"bound with K={samples} (conditional_nll) and the single-sample "
            "negative ELBO (conditional_nll_elbo); exact for the deterministic baseline"
        )
        return out


@register("cvae")
class CVAE(_Quadrants):
    """The conditional VAE; `model`/`guide(x, y=None, n_data=None, beta=1.0, given=None)`
    (`y`: labels for `condition = "label"`; `given`: a fixed number of given quadrants for
    `condition = "quadrants"`, else by position)."""

    def __init__(self, model_config, data_shape: tuple[int, ...]) -> None:
        super().__init__()
        check_mlp(model_config, "cvae")
        self.config, self.data_shape = model_config, tuple(data_shape)
        self.data_dim, self.latent_dim = math.prod(data_shape), model_config.latent_dim
        self.condition = model_config.condition or "label"
        d, k = self.data_dim, self.latent_dim
        if self.condition == "label":
            if model_config.given is not None:
                raise ConfigError('model.given applies to model.condition = "quadrants"')
            self.uses_labels = self.conditions_on_labels = True
            self.partial_labels = False
            self.classes = model_config.classes or 10
            self.log_likelihood_of = "log p(x | y), the test labels given"
            c_dim = self.classes
        else:
            if model_config.classes is not None:
                raise ConfigError('model.classes applies to model.condition = "label"')
            self._setup(model_config, data_shape, "cvae")
            c_dim = d
            #: the figures' "reconstructions": completions of the right half from the left
            self.reconstruct = partial(self.complete, given=2)
            self.prior_net = build_network(model_config.encoder, (d,), (2 * k,), name="model.encoder")
        self.likelihood = build_likelihood(model_config.likelihood, d)
        p = self.likelihood.params_per_feature
        #: `model.baseline_run`: the baseline's network, frozen (its weights are loaded by
        #: `before_training` in a new run, and saved with the model)
        self.baseline: Frozen | None = None
        if model_config.baseline_run is not None:
            self.baseline = Frozen(build_network(model_config.encoder, (d,), (p * d,), name="model.encoder"))
        self.encoder = build_network(model_config.encoder, (d + c_dim,), (2 * k,), name="model.encoder")
        #: `model.decoder_reads_condition = false`: p(x | z) reads z alone (Pyro's example)
        self.decoder_reads_c = model_config.decoder_reads_condition is not False
        dec_in = k + c_dim if self.decoder_reads_c else k
        self.decoder = build_network(model_config.decoder, (dec_in,), (p * d,), name="model.decoder")
        self.pyro_name = f"cvae{next(_ids)}"

    def _condition(self, x, y, given):
        """(c, given-pixel mask or None): the one-hot label, or the image with hidden pixels."""
        if self.condition == "label":
            if y is None:
                raise ValueError('a CVAE with condition = "label" needs the labels y')
            return one_hot(y.long(), self.classes).to(x.dtype), None
        gmask = self.given_mask(x, given)
        return torch.where(gmask, x, torch.full_like(x, HIDDEN)), gmask

    def prior_input(self, c: torch.Tensor, gmask: torch.Tensor) -> torch.Tensor:
        """What the prior net $p(z \\mid x_g)$ reads: the image with its hidden pixels at -1,
        or, with `model.baseline_run`, filled with the frozen baseline's prediction
        $E[x_{\\bar g} \\mid x_g]$ (Pyro's CVAE example: the CVAE starts from the baseline's guess)."""
        if self.baseline is None:
            return c
        with torch.no_grad():
            guess = self.likelihood.mean(self._unflatten(self.baseline(c)))
        return torch.where(gmask, c, guess)

    def before_training(self, data=None) -> None:
        """A new run (not a resumed one): copy the network of `model.baseline_run` (a trained
        `cvae_baseline` run of the same data shape, encoder and likelihood) into `baseline`.
        A `ConfigError` naming the field otherwise."""
        if self.baseline is None:
            return
        from pyrovae.errors import PyroVAEError
        from pyrovae.runs import load_run

        where = f"model.baseline_run = {self.config.baseline_run!r}"
        try:
            run = load_run(self.config.baseline_run)
        except PyroVAEError as e:
            raise ConfigError(f"{where}: expected a trained cvae_baseline run folder: {e}") from None
        got = run.config.model
        if got.kind != "cvae_baseline":
            raise ConfigError(f"{where}: expected a run of model.kind = 'cvae_baseline'; got {got.kind!r}")
        if tuple(run.model.data_shape) != self.data_shape:
            raise ConfigError(
                f"{where}: expected a baseline trained on points of shape {self.data_shape}; "
                f"got {tuple(run.model.data_shape)}"
            )
        for key in ("encoder", "likelihood"):
            if getattr(got, key) != getattr(self.config, key):
                raise ConfigError(
                    f"{where}: expected the baseline's model.{key} to equal this model's "
                    f"({getattr(self.config, key)!r}); got {getattr(got, key)!r}"
                )
        self.baseline.load_weights(run.model.net.state_dict())

    @staticmethod
    def _normal(h: torch.Tensor, k: int) -> dist.Distribution:
        return dist.Normal(h[..., :k], softplus(h[..., k:]) + 1e-5).to_event(1)

    def model(self, x, y=None, n_data=None, beta=1.0, given=None):
        """p(z | c) p(x | z, c) (quadrants: over the missing pixels only)."""
        pyro.module(self.pyro_name, self)
        c, gmask = self._condition(x, y, given)
        with self._plate(x, n_data):
            k = self.latent_dim
            if gmask is None:
                prior = dist.Normal(x.new_zeros(k), x.new_ones(k)).to_event(1)
            else:
                prior = self._normal(self.prior_net(self.prior_input(c, gmask)), k)
            with latent_weight(beta):
                z = pyro.sample("z", prior)
            raw = self.decode(z, c)
            if gmask is None:
                pyro.sample("x", self.likelihood(self._unflatten(raw)), obs=x)
            else:
                self._missing_site(raw, x, gmask)

    def guide(self, x, y=None, n_data=None, beta=1.0, given=None):
        """q(z | x, c)."""
        pyro.module(self.pyro_name, self)
        c, _ = self._condition(x, y, given)
        with self._plate(x, n_data), latent_weight(beta):
            pyro.sample("z", self._normal(forward_concat(self.encoder, x, c), self.latent_dim))

    def _unflatten(self, raw: torch.Tensor) -> torch.Tensor:
        return raw.reshape(*raw.shape[:-1], self.likelihood.params_per_feature, self.data_dim)

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The likelihood's raw parameters from $[z, c]$, or from $z$ alone with
        `model.decoder_reads_condition = false`."""
        return forward_concat(self.decoder, z, c) if self.decoder_reads_c else self.decoder(z)

    @torch.no_grad()
    def sample(self, n: int, label: int | None = None) -> torch.Tensor:
        """$E[x \\mid z, y]$, $z \\sim p(z)$, $y$ = `label` (condition "label"; without one
        the classes in turn), `(n, D)`."""
        if self.condition != "label":
            raise ValueError(
                'a CVAE with condition = "quadrants" completes given images: use '
                "CVAE.complete(x, given) (pyrovae sample cannot draw it without images)"
            )
        device = next(self.parameters()).device
        if label is None:  # every class in turn
            y = torch.arange(n, device=device) % self.classes
        elif not 0 <= label < self.classes:
            raise ValueError(
                f"--label: expected a class in 0..{self.classes - 1} (model.classes = "
                f"{self.classes}); got {label}"
            )
        else:
            y = torch.full((n,), label, device=device)
        c = one_hot(y, self.classes).float()
        z = torch.randn(n, self.latent_dim, device=device)
        return self.likelihood.mean(self._unflatten(self.decode(z, c)))

    @torch.no_grad()
    def complete(self, x: torch.Tensor, given: int) -> torch.Tensor:
        """Images `x` `(N, D)` with their missing quadrants drawn as $E[x \\mid z, x_g]$,
        $z \\sim p(z \\mid x_g)$; the `given` quadrants are copied from `x`."""
        if self.condition != "quadrants":
            raise ValueError('complete() applies to condition = "quadrants"')
        if x.dim() != 2 or x.shape[-1] != self.data_dim:
            raise ValueError(
                f"complete: expected images of shape (N, {self.data_dim}); got {tuple(x.shape)}"
            )
        c, gmask = self._condition(x, None, given)
        z = self._normal(self.prior_net(self.prior_input(c, gmask)), self.latent_dim).sample()
        mean = self.likelihood.mean(self._unflatten(self.decode(z, c)))
        return torch.where(gmask, x, mean)

    @torch.no_grad()
    def metrics(
        self, x: torch.Tensor, y: torch.Tensor | None = None, samples: int = CONDITIONAL_NLL_SAMPLES
    ) -> dict:
        if self.condition == "quadrants":
            return super().metrics(x, y, samples)
        return {}


@register("cvae_baseline")
class QuadrantBaseline(_Quadrants):
    """The deterministic baseline of Pyro's CVAE example: $p(x_{\\bar g} \\mid x_g)$ =
    Bernoulli-like likelihood of one network's output; a Pyro model with an empty guide."""

    def __init__(self, model_config, data_shape: tuple[int, ...]) -> None:
        super().__init__()
        check_mlp(model_config, "cvae_baseline")
        self.config, self.data_shape = model_config, tuple(data_shape)
        self.data_dim = d = math.prod(data_shape)
        self._setup(model_config, data_shape, "cvae_baseline")
        self.likelihood = build_likelihood(model_config.likelihood, d)
        p = self.likelihood.params_per_feature
        self.net = build_network(model_config.encoder, (d,), (p * d,), name="model.encoder")
        self.pyro_name = f"cvae_baseline{next(_ids)}"

    def model(self, x, y=None, n_data=None, beta=1.0, given=None):
        """p(x_missing | x_given) from the network; no latent variable."""
        pyro.module(self.pyro_name, self)
        gmask = self.given_mask(x, given)
        with self._plate(x, n_data):
            self._missing_site(self.net(torch.where(gmask, x, torch.full_like(x, HIDDEN))), x, gmask)

    def guide(self, x, y=None, n_data=None, beta=1.0, given=None):
        """No latent variable: an empty guide (its ELBO is the exact log-likelihood)."""
        pyro.module(self.pyro_name, self)

    @torch.no_grad()
    def complete(self, x: torch.Tensor, given: int) -> torch.Tensor:
        gmask = self.given_mask(x, given)
        raw = self.net(torch.where(gmask, x, torch.full_like(x, HIDDEN)))
        mean = self.likelihood.mean(raw.reshape(*raw.shape[:-1], self.likelihood.params_per_feature, self.data_dim))
        return torch.where(gmask, x, mean)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.complete(x, 2)

    def sample(self, n: int) -> torch.Tensor:
        raise ValueError(
            "the quadrant baseline is deterministic and completes given images: use "
            "QuadrantBaseline.complete(x, given)"
        )
