r"""Mixture VAE with the cluster summed out exactly (`[model] kind = "gmvae"`).

Generative model, for each datapoint in `pyro.plate("data")`, with $K$ = `model.clusters`:

$$
c \sim \mathrm{Categorical}(1/K, \dots, 1/K), \qquad
z \mid c \sim \mathcal N(\mu_c, \mathrm{diag}\,\sigma_c^2), \qquad
x \mid z \sim \text{likelihood}(\text{decoder}_\theta(z)),
$$

with learned component means $\mu_c$ and scales $\sigma_c$ (the Gaussian mixture prior of
Dilokthanakul et al., "Deep Unsupervised Clustering with Gaussian Mixture Variational
Autoencoders", 2016, in the form of Rui Shu's "Gaussian Mixture VAE" post: $p(z \mid c)$ a
Gaussian per cluster, a uniform and fixed $p(c)$, which keeps every cluster in use).

Guide $q(c \mid x)\,q(z \mid x, c)$. The cluster is a discrete site marked
`infer={"enumerate": "parallel"}` in model and guide, so `TraceEnum_ELBO`
(`train.objective = "trace_enum"`) sums it out exactly instead of sampling it:

$$
\mathrm{ELBO}(x) = \sum_{c=1}^{K} q(c \mid x)\Big(
E_{q(z \mid x, c)}\big[\log p(x \mid z) + \log p(z \mid c) - \log q(z \mid x, c)\big]
+ \log p(c) - \log q(c \mid x)\Big),
$$

estimated with one reparameterized $z$ per cluster (all $K$ at once: the enumerated $c$ has
its own tensor dim left of the data plate).

**$q(z \mid x, c)$ or $q(z \mid x)$: `model.cluster_guide`.**

* `"conditional"` (default), $q(c \mid x)\,q(z \mid x, c)$, the factorization of Dilokthanakul
  et al. and Shu: each cluster proposes its own code, the $K$ proposals are scored against their
  own components, and the ELBO is the exact expectation over $c$ of a per-cluster VAE bound.
  One encoder pass gives the $K$ logits and the $K$ Gaussians (output size $K + 2KD$), but the
  decoder runs once per cluster: a step costs about $K$ decoder passes.
* `"mean_field"`, $q(c \mid x)\,q(z \mid x)$, the factorization of VaDE (Jiang et al.,
  "Variational Deep Embedding", IJCAI 2017): one code per point, so the decoder runs once and
  only the cheap terms $\log p(z \mid c) + \log p(c) - \log q(c \mid x)$ are enumerated,
  $$
  \mathrm{ELBO}(x) = E_{q(z|x)}\Big[\log p(x \mid z) - \log q(z \mid x)
  + \sum_c q(c \mid x)\big(\log p(z \mid c) + \log p(c) - \log q(c \mid x)\big)\Big];
  $$
  the optimal $q(c \mid x)$ is then $\propto \exp E_{q(z|x)}[\log p(z \mid c)\,p(c)]$, the
  responsibility of each component for the code. Its bound is looser (one code must serve all
  clusters) and a step costs about one VAE step.
* `"posterior"`, $q(z \mid x)\,q(c \mid z)$ with $q(c \mid z) = p(c \mid z) =
  p(c)\,p(z \mid c) / \sum_{c'} p(c')\,p(z \mid c')$, the exact posterior of the cluster given
  the code (VaDE's $q(c \mid x)$, Jiang et al. 2017, eq. 16). With that choice the enumerated
  terms collapse to the mixture density, $\sum_c q(c \mid z)(\log p(z \mid c) + \log p(c)
  - \log q(c \mid z)) = \log p(z)$, so
  $$
  \mathrm{ELBO}(x) = E_{q(z|x)}\big[\log p(x \mid z) + \log \textstyle\sum_c p(c)\,
  p(z \mid c) - \log q(z \mid x)\big],
  $$
  the best bound any $q(c \mid \cdot)$ gives for this $q(z \mid x)$; a point's cluster is
  $\arg\max_c p(c \mid z = \mu_\phi(x))$. The encoder has no logits: it has the shape of a
  VAE's, so `model.init_from` can start it from a trained VAE (`before_training`).

**`model.init_from`: VaDE's pretraining.** Mixture VAEs trained from scratch settle in poor
clusterings (the cluster accuracy of this model on MNIST levels off near 0.74,
docs/structured.md); Jiang et al. start from a pretrained autoencoder and a Gaussian mixture
fitted to its codes. `init_from = "<run folder>"` names a trained `kind = "vae"` run with the
Gaussian guide and the same `latent_dim`, `encoder`, `decoder` and `likelihood`; a new run
(not a resumed one) copies its encoder, decoder and likelihood, encodes the training points,
and sets $p(z \mid c)$ to a diagonal Gaussian mixture (scikit-learn's `GaussianMixture`, EM,
`random_state=0`) fitted to the posterior means $\mu_\phi(x)$ on the *informative*
dimensions, those whose means vary across points more than the code varies within a point,
$\mathrm{Var}_x\,\mu_{\phi,u}(x) > E_x\,\sigma^2_{\phi,u}(x)$. On the others every component
is the code's marginal moment match, mean $E_x\,\mu_u$ and variance
$\mathrm{Var}_x\,\mu_u + E_x\,\sigma^2_u$ (a diagonal mixture fitted on all 50 dimensions of
a VAE whose other 38 have collapsed follows their tiny residual variation and finds no digits);
the informative components also get $E_x\,\sigma^2_u$ added to their variances, so that
$p(z \mid c)$ covers the codes $q(z \mid x)$ draws, not only their means. $p(c)$ stays uniform.

`metrics(x, y)` reports `cluster_accuracy`, with each point assigned to
$\arg\max_c q(c \mid x)$: when `clusters` equals the number of classes the best one-to-one
matching of clusters to labels (Hungarian algorithm,
`scipy.optimize.linear_sum_assignment`), the protocol of the published GM-VAE figures; with
more clusters than classes the standard many-to-one accuracy, each cluster labelled by its
majority class. `sample(n, cluster=k)` draws $z \sim p(z \mid c = k)$.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import one_hot, softplus

from pyrovae.errors import ConfigError
from pyrovae.likelihoods import build_likelihood
from pyrovae.networks import build_network
from pyrovae.structured import register
from pyrovae.structured.plates import data_plate, latent_weight

#: default number of clusters when `model.clusters` is not given
DEFAULT_CLUSTERS = 10


@register("gmvae")
class GMVAE(nn.Module):
    """Gaussian-mixture VAE; `model`/`guide` are Pyro callables over a batch `x` of shape `(B, D)`.

    ```python
    gm = GMVAE(config.model, data_shape=(1, 28, 28))   # config.model.kind == "gmvae"
    elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)
    loss = elbo.differentiable_loss(gm.model, gm.guide, x)
    ```
    """

    uses_labels = False

    def __init__(self, model_config, data_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.config, self.data_shape = model_config, tuple(data_shape)
        self.data_dim = math.prod(self.data_shape)
        self.clusters = k = model_config.clusters or DEFAULT_CLUSTERS
        self.latent_dim = d = model_config.latent_dim
        self.cluster_guide = model_config.cluster_guide or "conditional"
        self.conditional = self.cluster_guide == "conditional"
        #: x -> K logits of q(c|x) (none for "posterior"), then K (loc, raw scale) pairs of
        #: q(z|x, c) (one: q(z|x))
        gaussians = k if self.conditional else 1
        logits = 0 if self.cluster_guide == "posterior" else k
        self.encoder = build_network(
            model_config.encoder, self.data_shape, (logits + 2 * gaussians * d,), name="model.encoder"
        )
        self.likelihood = build_likelihood(model_config.likelihood, self.data_dim)
        p = self.likelihood.params_per_feature
        self.decoder = build_network(
            model_config.decoder,
            (d,),
            (p * self.data_shape[0], *self.data_shape[1:]),
            name="model.decoder",
        )
        # p(z|c): spread-out means so the components start apart, unit scales
        g = torch.Generator().manual_seed(0)
        self.component_loc = nn.Parameter(torch.randn(k, d, generator=g))
        self.component_raw_scale = nn.Parameter(torch.full((k, d), math.log(math.e - 1)))
        self.register_buffer("prior_logits", torch.zeros(k))  # uniform p(c), fixed
        self.pyro_name = f"gmvae{id(self)}"

    # ---- the Pyro program -------------------------------------------------------------
    def model(self, x: torch.Tensor, y=None, n_data: int | None = None, beta: float = 1.0):
        """p(x, z, c) = p(c) p(z|c) p(x|z); `c` enumerated. Returns the sampled `z`."""
        pyro.module(self.pyro_name, self)
        with data_plate(x, n_data):
            with latent_weight(beta):
                c = pyro.sample(
                    "c",
                    dist.Categorical(logits=self.prior_logits),
                    infer={"enumerate": "parallel"},
                )
                z = pyro.sample("z", self.component(c))
            pyro.sample("x", self.likelihood_dist(z), obs=x)
        return z

    def guide(self, x: torch.Tensor, y=None, n_data: int | None = None, beta: float = 1.0):
        """q(c|x) q(z|x, c); `c` enumerated in parallel. Returns the sampled `z`."""
        pyro.module(self.pyro_name, self)
        with data_plate(x, n_data):
            if self.cluster_guide == "posterior":  # q(z|x) q(c|z), q(c|z) = p(c|z)
                loc, scale = self.q_z(x)
                with latent_weight(beta):
                    z = pyro.sample("z", dist.Normal(loc, scale).to_event(1))
                    pyro.sample(
                        "c",
                        dist.Categorical(logits=self.cluster_logits(z)),
                        infer={"enumerate": "parallel"},
                    )
                return z
            logits, loc, scale = self.q_params(x)
            with latent_weight(beta):
                c = pyro.sample(
                    "c", dist.Categorical(logits=logits), infer={"enumerate": "parallel"}
                )
                if self.conditional:
                    loc, scale = _pick(loc, c), _pick(scale, c)
                return pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # ---- deterministic pieces (no Pyro effects) ----------------------------------------
    def q_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q's parameters: logits `(..., K)` of q(c|x), and loc and scale of q(z|x, c),
        `(..., K, D)` (`conditional`), or of q(z|x), `(..., D)` (`mean_field`)."""
        k, d = self.clusters, self.latent_dim
        if self.cluster_guide == "posterior":
            loc, scale = self.q_z(x)
            return self.cluster_logits(loc), loc, scale
        h = self.encoder(x)
        logits, rest = h[..., :k], h[..., k:]
        if self.conditional:
            rest = rest.reshape(*h.shape[:-1], k, 2 * d)
        return logits, rest[..., :d], softplus(rest[..., d:]) + 1e-5

    def q_z(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loc and scale of q(z|x), `(..., D)`, for `cluster_guide = "posterior"` (the encoder
        laid out as a VAE's: D locs, then D raw scales)."""
        h = self.encoder(x)
        d = self.latent_dim
        return h[..., :d], softplus(h[..., d:]) + 1e-5

    def cluster_logits(self, z: torch.Tensor) -> torch.Tensor:
        r"""$\log p(c) + \log p(z \mid c)$ for codes `z (..., D)`, shape `(..., K)`: the
        unnormalized log posterior $\log p(c \mid z)$."""
        comps = self.component(torch.arange(self.clusters, device=z.device))
        return torch.log_softmax(self.prior_logits, -1) + comps.log_prob(z.unsqueeze(-2))

    def component(self, c: torch.Tensor) -> dist.TorchDistribution:
        """p(z | c) for cluster indices `c` of any shape: batch shape `c.shape`, event `(D,)`."""
        scale = softplus(self.component_raw_scale) + 1e-5
        return dist.Normal(self.component_loc[c], scale[c]).to_event(1)

    @torch.no_grad()
    def before_training(self, data=None) -> None:
        """A new run (not a resumed one) with `model.init_from`: copy the VAE run's encoder,
        decoder and likelihood, and fit p(z|c) to its codes of `data.x_train` (the module
        docstring has the recipe). A `ConfigError` naming the field if the run does not fit."""
        if self.config.init_from is None:
            return
        from sklearn.mixture import GaussianMixture

        from pyrovae.data import row_chunks
        from pyrovae.errors import PyroVAEError
        from pyrovae.runs import load_run

        where = f"model.init_from = {self.config.init_from!r}"
        try:
            run = load_run(self.config.init_from)
        except PyroVAEError as e:
            raise ConfigError(f"{where}: expected a trained VAE run folder: {e}") from None
        got = run.config.model
        guide = getattr(getattr(got, "guide", None), "kind", None)
        if got.kind != "vae" or guide != "normal":
            raise ConfigError(
                f"{where}: expected a run of model.kind = 'vae' with the Gaussian guide; got "
                f"kind = {got.kind!r}" + (f", guide.kind = {guide!r}" if guide else "")
            )
        if tuple(run.model.data_shape) != self.data_shape:
            raise ConfigError(
                f"{where}: expected a VAE trained on points of shape {self.data_shape}; got "
                f"{tuple(run.model.data_shape)}"
            )
        for key in ("latent_dim", "encoder", "decoder", "likelihood"):
            if getattr(got, key) != getattr(self.config, key):
                raise ConfigError(
                    f"{where}: expected the run's model.{key} to equal this model's "
                    f"({getattr(self.config, key)!r}); got {getattr(got, key)!r}"
                )
        vae = run.model.cpu().eval()
        self.encoder.load_state_dict(vae.posterior.encoder.state_dict())
        self.decoder.load_state_dict(vae.decoder.state_dict())
        self.likelihood.load_state_dict(vae.likelihood.state_dict())
        if data is None or len(data.x_train) < self.clusters:
            raise ConfigError(f"{where}: needs at least {self.clusters} training points to fit p(z|c) to")
        parts = [vae.posterior.encode(b) for c in row_chunks(data.x_train) for b in c.split(4096)]
        loc = torch.cat([p[0] for p in parts]).double()
        noise = torch.cat([p[1] for p in parts]).double().pow(2).mean(0)  # E_x sigma^2
        spread = loc.var(0)  # Var_x mu
        informative = spread > noise
        if not informative.any():
            raise ConfigError(
                f"{where}: no latent dimension of the run carries information (Var_x mu <= "
                "E_x sigma^2 in every one: the VAE has collapsed), so its codes have no clusters to fit"
            )
        gmm = GaussianMixture(self.clusters, covariance_type="diag", random_state=0, max_iter=500)
        gmm.fit(loc[:, informative].numpy())
        means = loc.mean(0).expand(self.clusters, -1).clone()
        var = (spread + noise).expand(self.clusters, -1).clone()
        means[:, informative] = torch.as_tensor(gmm.means_, dtype=means.dtype)
        var[:, informative] = torch.as_tensor(gmm.covariances_, dtype=var.dtype) + noise[informative]
        dev = self.component_loc.device
        self.component_loc.copy_(means.to(dev))
        self.component_raw_scale.copy_(torch.log(torch.expm1(var.sqrt() - 1e-5)).to(dev))
        #: what the initialization did (number of informative dimensions)
        self.init_informative = int(informative.sum())

    def _unflatten(self, raw: torch.Tensor) -> torch.Tensor:
        return raw.reshape(*raw.shape[:-1], self.likelihood.params_per_feature, self.data_dim)

    def likelihood_dist(self, z: torch.Tensor) -> dist.TorchDistribution:
        """p(x | z) with event shape `(D,)`."""
        return self.likelihood(self._unflatten(self.decoder(z)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """$E[x \\mid z]$, shape `(..., D)`."""
        return self.likelihood.mean(self._unflatten(self.decoder(z)))

    def cluster_probs(self, x: torch.Tensor) -> torch.Tensor:
        """$q(c \\mid x)$, shape `(N, K)`."""
        return torch.softmax(self.q_params(x)[0], -1)

    @torch.no_grad()
    def assign(self, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Cluster of each point, $\\arg\\max_c q(c \\mid x)$, shape `(N,)`."""
        return torch.cat([self.q_params(xb)[0].argmax(-1) for xb in x.split(batch_size)])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean code $E_q[z \\mid x]$ ($\\sum_c q(c|x)\\,\\mu_\\phi(x, c)$ for
        the conditional guide)."""
        logits, loc, _ = self.q_params(x)
        if not self.conditional:
            return loc
        return (torch.softmax(logits, -1).unsqueeze(-1) * loc).sum(-2)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def sample(self, n: int, cluster: int | None = None, mean: bool = True) -> torch.Tensor:
        """`c ~ p(c)` (or `c = cluster`), `z ~ p(z|c)`; returns $E[x|z]$ (or a draw of x)."""
        device = self.component_loc.device
        if cluster is None:
            c = dist.Categorical(logits=self.prior_logits).sample((n,))
        else:
            if not 0 <= int(cluster) < self.clusters:
                raise ConfigError(
                    f"cluster: expected an integer in [0, {self.clusters - 1}] "
                    f"(model.clusters = {self.clusters}); got {cluster}"
                )
            c = torch.full((n,), int(cluster), dtype=torch.long, device=device)
        z = self.component(c).sample()
        return self.decode(z) if mean else self.likelihood_dist(z).sample()

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, float]:
        """`cluster_accuracy` against the labels `y` (see the module docstring for the
        protocol), `clusters_used` (clusters that are the argmax of at least one point)."""
        pred = self.assign(x).cpu()
        out = {"clusters_used": float(pred.unique().numel())}
        if y is not None:
            out["cluster_accuracy"] = cluster_accuracy(pred, y.cpu(), self.clusters)
        return out


def _pick(params: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """`params[..., c, :]` for `params (..., K, D)` and cluster indices `c` that broadcast with
    the leading dims (a sampled `c` of shape `(B,)`, an enumerated one of shape `(K, 1)`)."""
    onehot = one_hot(c, params.shape[-2]).to(params.dtype).unsqueeze(-1)
    return (onehot * params).sum(-2)


def cluster_accuracy(pred: torch.Tensor, labels: torch.Tensor, clusters: int) -> float:
    """Unsupervised clustering accuracy of cluster assignments `pred` against `labels`.

    With `clusters` equal to the number of classes (`labels.max() + 1`): the best one-to-one
    map of clusters to classes (Hungarian algorithm on the contingency table,
    `scipy.optimize.linear_sum_assignment`). Otherwise many-to-one: each cluster is mapped to
    the class most of its points carry.
    """
    from scipy.optimize import linear_sum_assignment

    pred, labels = pred.long().numpy(), labels.long().numpy()
    classes = int(labels.max()) + 1
    table = np.zeros((clusters, classes), dtype=np.int64)
    np.add.at(table, (pred, labels), 1)
    if clusters == classes:
        rows, cols = linear_sum_assignment(table, maximize=True)
        hits = table[rows, cols].sum()
    else:
        hits = table.max(1).sum()
    return float(hits / len(labels))
