r"""M2: the semi-supervised VAE of Kingma, Rezende, Mohamed and Welling (NeurIPS 2014).

Generative model, per datapoint (`M2.model`):

$$
y \sim \mathrm{Cat}(1/C), \qquad z \sim \mathcal N(0, I), \qquad
x \sim p_\theta(x \mid y, z) = \text{likelihood}(\text{decoder}_\theta([z, \mathrm{onehot}(y)])).
$$

Guide (`M2.guide`): $q_\phi(y \mid x) = \mathrm{Cat}(\pi_\phi(x))$ (the classifier),
$q_\phi(z \mid x, y) = \mathcal N(\mu_\phi(x, y), \mathrm{diag}\,\sigma^2_\phi(x, y))$.

A minibatch mixes labelled and unlabelled points (the trainer passes its labels `y`, -1 where
unlabelled; `[data] labels = N` keeps N of them) and goes through one ELBO:

* unlabelled $x$: the guide's site `y` is marked `infer={"enumerate": "parallel"}`, and
  `TraceEnum_ELBO` (`[train] objective = "trace_enum"`) sums it out exactly,
  $\mathcal U(x) = \sum_y q(y \mid x)\,[\mathcal L(x, y)] + \mathcal H(q(y \mid x))$ with
  $\mathcal L(x, y) = E_{q(z|x,y)}[\log p(x \mid y, z) + \log p(y) + \log p(z) - \log q(z \mid x, y)]$;
* labelled $(x, y)$: the guide's $q(y \mid x, y_{obs})$ is the point mass on the label (its
  logits are $-10^4$ elsewhere), so the same sum is exactly $\mathcal L(x, y_{obs})$;
* the classifier term $\alpha \cdot E[-\log q_\phi(y \mid x)]$ on labelled points, Kingma's
  $\mathcal J^\alpha$, is a `pyro.factor` in the model, masked to the labelled points.

So the loss per datapoint is $-\mathcal U(x)$ or $-\mathcal L(x, y) - \alpha \log q(y \mid x)$,
scaled by $N/B$ as every pyrovae model is (the Pyro SS-VAE example instead alternates
labelled and unlabelled batches with a second, auxiliary SVI loss). With
`objective = "trace_elbo"` the site `y` is *sampled* (score-function gradient): the ablation
that, per the Pyro tutorial, leaves the classifier near chance.

References: Kingma et al., "Semi-supervised learning with deep generative models", 2014;
Pyro's SS-VAE tutorial (`examples/vae/ss_vae_M2.py`).
"""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import one_hot, softplus

from pyrovae.errors import ConfigError
from pyrovae.likelihoods import build_likelihood
from pyrovae.model import latent_weight
from pyrovae.networks import build_network, forward_concat
from pyrovae.structured import register

_ids = itertools.count()
#: the classifier's logit for every class but the label, for a labelled point (q(y) = δ)
POINT_MASS_LOGIT = -1e4


def check_mlp(model_config, kind: str) -> None:
    """Structured models concatenate a condition to the input: MLP networks only."""
    for block in ("encoder", "decoder"):
        spec = getattr(model_config, block)
        if spec.kind not in ("mlp", "linear"):
            raise ConfigError(
                f"model.{block}: model.kind = {kind!r} concatenates a one-hot label to the "
                f'network\'s input, so it takes kind = "mlp" or "linear"; got {spec.kind!r}'
            )
    if model_config.prior.kind != "normal":
        raise ConfigError(
            f'model.prior: model.kind = {kind!r} has its own p(z); expected kind = "normal", '
            f"got {model_config.prior.kind!r}"
        )
    if model_config.guide.kind != "normal":
        raise ConfigError(
            f'model.guide: model.kind = {kind!r} has its own q(z|...); expected kind = "normal", '
            f"got {model_config.guide.kind!r}"
        )


@register("m2")
class M2(nn.Module):
    """Kingma et al.'s M2 as a Pyro program; `model`/`guide(x, y=None, n_data=None, beta=1.0)`.

    ```python
    m2 = M2(config.model, data_shape=(1, 28, 28))
    elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)
    loss = elbo.differentiable_loss(m2.model, m2.guide, x, y=y)  # y: -1 where unlabelled
    ```
    """

    uses_labels = True
    partial_labels = True
    conditions_on_labels = False

    def __init__(self, model_config, data_shape: tuple[int, ...]) -> None:
        super().__init__()
        check_mlp(model_config, "m2")
        self.config, self.data_shape = model_config, tuple(data_shape)
        self.data_dim, self.latent_dim = math.prod(data_shape), model_config.latent_dim
        self.classes = model_config.classes or 10
        self.alpha = 46.0 if model_config.alpha is None else model_config.alpha
        c, d, k = self.classes, self.data_dim, self.latent_dim
        self.classifier = build_network(model_config.encoder, (d,), (c,), name="model.encoder")
        self.encoder_z = build_network(model_config.encoder, (d + c,), (2 * k,), name="model.encoder")
        self.likelihood = build_likelihood(model_config.likelihood, d)
        p = self.likelihood.params_per_feature
        self.decoder = build_network(model_config.decoder, (k + c,), (p * d,), name="model.decoder")
        self.pyro_name = f"m2_{next(_ids)}"

    # ---- the Pyro program -------------------------------------------------------------
    def _plate(self, x: torch.Tensor, n_data: int | None) -> pyro.plate:
        b = x.shape[0]
        if n_data is None or n_data == b:
            return pyro.plate("data", b, device=x.device)
        return pyro.plate("data", n_data, subsample=torch.arange(b, device=x.device))

    def model(self, x, y=None, n_data=None, beta=1.0):
        """p(x, y, z) = p(y) p(z) p(x | y, z), plus α log q(y|x) on labelled points."""
        pyro.module(self.pyro_name, self)
        with self._plate(x, n_data):
            with latent_weight(beta):
                z = pyro.sample(
                    "z",
                    dist.Normal(x.new_zeros(self.latent_dim), x.new_ones(self.latent_dim)).to_event(1),
                )
            label = pyro.sample("y", dist.Categorical(logits=x.new_zeros(self.classes)))
            raw = forward_concat(self.decoder, z, self._one_hot(label))
            pyro.sample("x", self.likelihood(self._unflatten(raw)), obs=x)
            if y is not None and self.alpha > 0:
                labelled = y >= 0
                log_q = dist.Categorical(logits=self.classifier(x)).log_prob(y.clamp(min=0))
                with pyro.poutine.mask(mask=labelled):
                    pyro.factor("classifier", self.alpha * log_q)

    def guide(self, x, y=None, n_data=None, beta=1.0):
        """q(y | x) q(z | x, y); `y` enumerated (unlabelled) or a point mass (labelled)."""
        pyro.module(self.pyro_name, self)
        with self._plate(x, n_data):
            logits = self.classifier(x)
            if y is not None:
                point = torch.full_like(logits, POINT_MASS_LOGIT)
                point = point.scatter(-1, y.clamp(min=0).unsqueeze(-1), 0.0)
                logits = torch.where((y >= 0).unsqueeze(-1), point, logits)
            label = pyro.sample(
                "y", dist.Categorical(logits=logits), infer={"enumerate": "parallel"}
            )
            h = forward_concat(self.encoder_z, x, self._one_hot(label))
            loc, scale = h[..., : self.latent_dim], softplus(h[..., self.latent_dim :]) + 1e-5
            with latent_weight(beta):
                pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # ---- deterministic helpers ----------------------------------------------------------
    def _one_hot(self, label: torch.Tensor) -> torch.Tensor:
        return one_hot(label.long(), self.classes).to(torch.get_default_dtype())

    def _unflatten(self, raw: torch.Tensor) -> torch.Tensor:
        return raw.reshape(*raw.shape[:-1], self.likelihood.params_per_feature, self.data_dim)

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """$\\arg\\max_y q_\\phi(y \\mid x)$, shape `(N,)`."""
        return torch.cat([self.classifier(xb).argmax(-1) for xb in x.split(4096)])

    def _check_label(self, label: int) -> None:
        if not 0 <= label < self.classes:
            raise ValueError(
                f"--label: expected a class in 0..{self.classes - 1} (model.classes = "
                f"{self.classes}); got {label}"
            )

    @torch.no_grad()
    def sample(self, n: int, label: int | None = None) -> torch.Tensor:
        """$E[x \\mid y, z]$ with $z \\sim p(z)$ and $y$ = `label` (or $y \\sim p(y)$), `(n, D)`."""
        device = next(self.parameters()).device
        if label is None:
            y = torch.randint(self.classes, (n,), device=device)
        else:
            self._check_label(label)
            y = torch.full((n,), label, device=device)
        z = torch.randn(n, self.latent_dim, device=device)
        return self.likelihood.mean(self._unflatten(forward_concat(self.decoder, z, self._one_hot(y))))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """$E[x \\mid \\hat y, z = \\mu(x, \\hat y)]$ with $\\hat y = \\arg\\max q(y|x)$."""
        y = self._one_hot(self.classify(x))
        loc = forward_concat(self.encoder_z, x, y)[..., : self.latent_dim]
        return self.likelihood.mean(self._unflatten(forward_concat(self.decoder, loc, y)))

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, float | str]:
        """`test_accuracy` of the classifier $\\arg\\max q(y \\mid x)$ on the split."""
        if y is None:
            return {"test_accuracy_note": "the test split has no labels"}
        return {
            "test_accuracy": float((self.classify(x) == y).double().mean()),
            "test_accuracy_note": "argmax q(y|x) against the test labels",
        }
