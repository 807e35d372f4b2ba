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
        self.conditional = (model_config.cluster_guide or "conditional") == "conditional"
        #: x -> K logits of q(c|x), then K (loc, raw scale) pairs of q(z|x, c) (one: q(z|x))
        gaussians = k if self.conditional else 1
        self.encoder = build_network(
            model_config.encoder, self.data_shape, (k + 2 * gaussians * d,), name="model.encoder"
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
        h = self.encoder(x)
        logits, rest = h[..., :k], h[..., k:]
        if self.conditional:
            rest = rest.reshape(*h.shape[:-1], k, 2 * d)
        return logits, rest[..., :d], softplus(rest[..., d:]) + 1e-5

    def component(self, c: torch.Tensor) -> dist.TorchDistribution:
        """p(z | c) for cluster indices `c` of any shape: batch shape `c.shape`, event `(D,)`."""
        scale = softplus(self.component_raw_scale) + 1e-5
        return dist.Normal(self.component_loc[c], scale[c]).to_event(1)

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
