r"""Training objectives: which `pyro.infer` ELBO trains the model, and the β / KL warm-up schedule.

`train.objective` picks one of Pyro's own ELBO classes, used as they are:

| objective | class | estimate per datapoint, $z_k \sim q(z \mid x)$ |
|---|---|---|
| `trace_elbo` | `pyro.infer.Trace_ELBO` | $\frac1K\sum_k \log p(x,z_k) - \log q(z_k\mid x)$ |
| `mean_field` | `pyro.infer.TraceMeanField_ELBO` | $\frac1K\sum_k \log p(x\mid z_k) - \mathrm{KL}(q\,\|\,p)$, the KL analytic where registered |
| `trace_enum` | `pyro.infer.TraceEnum_ELBO` | as `trace_elbo`, with discrete sites marked `infer={"enumerate": "parallel"}` summed out exactly |
| `iwae` | `IWAE_ELBO` (below) | $\log \frac1K\sum_k p(x,z_k)/q(z_k\mid x)$ (Burda et al. 2016) |

Every one is a per-datapoint bound on $\log p(x)$, and every training step calls
`elbo.differentiable_loss(model, guide, x, N, beta)` on the Pyro program itself: there is no
second loss path. With `pyro.plate("data", N, subsample=...)` in the model the result is an
unbiased estimate of the full-data negative ELBO; `make_loss` divides it by N (nats per
datapoint).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.infer
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import kl_divergence

from pyrovae.evaluate import trace_log_prob, vectorized_traces
from pyrovae.model import VAE
from pyrovae.structured import STRUCTURED

#: every built-in pyrovae model has one plate ("data"); particles go to the dim left of it
MAX_PLATE_NESTING = 1
OBJECTIVES = ("trace_elbo", "mean_field", "trace_enum", "iwae")


class DifferentiableELBO(pyro.infer.ELBO):
    """A `pyro.infer.ELBO` defined by its `differentiable_loss`: `loss` and `loss_and_grads`
    (what `pyro.infer.SVI` calls) follow from it."""

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """As `pyro.infer.SVI` calls it: backward into the parameters, return the loss."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()


class IWAE_ELBO(DifferentiableELBO):
    r"""The importance-weighted bound (IWAE; Burda et al., ICLR 2016) as a `pyro.infer.ELBO`.

    Per datapoint $x_b$ of a minibatch of $B$ out of $N$,

    $$
    \mathcal L_K(x_b) = \log \frac1K \sum_{k=1}^K w_{kb},\qquad
    \log w_{kb} = \log p(x_b \mid z_{kb}) + \beta\,[\log p(z_{kb}) - \log q(z_{kb} \mid x_b)],
    $$

    $z_{kb} \sim q(z \mid x_b)$ reparameterized, and `differentiable_loss` returns
    $-\frac{N}{B}\sum_b \mathcal L_K(x_b)$, an unbiased estimate of the full-data negative bound
    (as Pyro's plate scaling makes it for the other ELBOs). The log weights are those
    `pyrovae.evaluate.log_weights` computes: the particles are a vectorized `pyro.plate` left of
    the model's plates, so one model call scores all $K \times B$ draws. $K = 1$ is the ELBO.
    β weights the latent sites (observed sites keep weight 1), as `poutine.scale` does for the
    other objectives. Unlike `RenyiELBO(alpha=0)`, which computes the same bound, it has a
    `differentiable_loss`, so it trains with any `torch.optim` optimizer.
    """

    def __init__(self, num_particles: int = 1, max_plate_nesting: int = MAX_PLATE_NESTING):
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=True,
        )

    def _get_trace(self, model, guide, args, kwargs):
        """`(model_trace, guide_trace)` with the particles vectorized (as `pyro.infer.ELBO`)."""
        g, m, _ = vectorized_traces(
            model, guide, *args, max_plate_nesting=self.max_plate_nesting, **kwargs
        )
        return m, g

    def differentiable_loss(self, model, guide, x, n_data=None, beta=1.0, *args, **kwargs):
        k, b = self.num_particles, x.shape[0]
        g, m, pdim = vectorized_traces(
            model, guide, x, k, *args, max_plate_nesting=self.max_plate_nesting, hide=False, **kwargs
        )
        log_px = trace_log_prob(m, pdim, k, b, observed=True)
        log_pz = trace_log_prob(m, pdim, k, b, observed=False)
        log_w = log_px + beta * (log_pz - trace_log_prob(g, pdim, k, b))
        bound = torch.logsumexp(log_w, 0) - math.log(k)
        scale = 1.0 if n_data is None else n_data / b
        return -scale * bound.sum()


def _site_sum(trace, name: str) -> torch.Tensor:
    """Site `name`'s log density, scaled and masked as the site says, summed (`Trace.log_prob_sum`)."""
    return trace.log_prob_sum(lambda n, _site: n == name)


class CapturableELBO(DifferentiableELBO):
    r"""`Trace_ELBO` (or, with `mean_field=True`, `TraceMeanField_ELBO`) for fully
    reparameterized guides, computed from the program's Pyro traces with no read on the host:
    what a CUDA graph can record (`pyrovae.cuda_graph`).

    Pyro's own classes report the loss as a float plus the surrogate's deviation from its
    float (`torch_item`) and test it for NaN (`warn_if_nan`): host reads, which a capture
    forbids. This class runs the same program through the same public handlers — the guide
    under `poutine.trace`, the model under `poutine.trace(poutine.replay(model, guide_trace))`,
    the $K$ particles as Pyro's vectorized plate `"num_particles_vectorized"` left of the
    model's plates, subsample sites pruned — and keeps every value a tensor:

    $$
    \text{loss} = -\frac1K \sum_{k=1}^K \Big[\log p(x, z_k) - \log q(z_k \mid x)\Big]
    \quad\text{or, mean field,}\quad
    -\frac1K \sum_k \Big[\log p(x \mid z_k) - \sum_{s} \mathrm{KL}\big(q_s \,\|\, p_s\big)\Big],
    $$

    each site's term scaled and masked as the site says (plate subsampling $N/B$, β), the KL
    analytic where `kl_divergence` is registered and $\log q(z_k) - \log p(z_k)$ otherwise, as
    `TraceMeanField_ELBO` does. For reparameterized latent sites the gradient of this value is
    exactly the gradient of Pyro's surrogate loss (the score-function term is zero), so value
    and gradient equal `Trace_ELBO`'s / `TraceMeanField_ELBO`'s on the same draws (tested).
    A latent site without `rsample` is a `ValueError` naming it. NaNs are not reported here:
    the trainer reads the loss every `train.sync_every` steps and rolls back.
    """

    def __init__(self, num_particles: int = 1, max_plate_nesting: int = MAX_PLATE_NESTING,
                 mean_field: bool = False) -> None:
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=num_particles > 1,
        )
        self.mean_field = mean_field

    def _vectorize(self, fn: Callable) -> Callable:
        if self.num_particles == 1:
            return fn

        def wrapped(*args, **kwargs):
            with pyro.plate("num_particles_vectorized", self.num_particles,
                            dim=-(self.max_plate_nesting + 1)):
                return fn(*args, **kwargs)

        return wrapped

    def _get_trace(self, model, guide, args, kwargs):
        """`(model_trace, guide_trace)` of one draw, subsample sites pruned (the hook
        `pyro.infer.ELBO` asks its subclasses for)."""
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        return prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        model_trace, guide_trace = self._get_trace(
            self._vectorize(model), self._vectorize(guide), args, kwargs
        )
        elbo: torch.Tensor | float = 0.0
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                elbo = elbo + _site_sum(model_trace, name)
                continue
            if name not in guide_trace.nodes:
                raise ValueError(
                    f"CapturableELBO: the model's latent site {name!r} has no site in the guide"
                )
            g = guide_trace.nodes[name]
            if not getattr(g["fn"], "has_rsample", False):
                raise ValueError(
                    f"CapturableELBO: the guide's site {name!r} ({type(g['fn']).__name__}) is "
                    "not reparameterized; expected every latent site to have rsample"
                )
            kl = None
            if self.mean_field:
                try:
                    kl = kl_divergence(g["fn"], site["fn"])
                except NotImplementedError:
                    pass
            if kl is not None:
                elbo = elbo - scale_and_mask(kl, g["scale"], g["mask"]).sum()
            else:
                elbo = (elbo + _site_sum(model_trace, name)
                        - _site_sum(guide_trace, name))
        for name, g in guide_trace.nodes.items():  # guide-only (auxiliary) sites: - log q
            if g["type"] == "sample" and not g["is_observed"] and name not in model_trace.nodes:
                elbo = elbo - _site_sum(guide_trace, name)
        return -elbo / self.num_particles


def make_elbo(
    objective: str = "trace_elbo", num_particles: int = 1, capturable: bool = False
) -> pyro.infer.ELBO:
    """The `pyro.infer` ELBO for `train.objective` with `num_particles` samples (vectorized).
    `capturable=True`: the same estimator with no host reads (`CapturableELBO` for
    `trace_elbo` / `mean_field`; `IWAE_ELBO` has none), for a CUDA graph."""
    if objective == "iwae":
        return IWAE_ELBO(num_particles, MAX_PLATE_NESTING)
    if capturable:
        if objective not in ("trace_elbo", "mean_field"):
            raise ValueError(
                f"objective {objective!r} has no capturable form: expected trace_elbo, "
                "mean_field or iwae"
            )
        return CapturableELBO(num_particles, MAX_PLATE_NESTING, mean_field=objective == "mean_field")
    classes = {
        "trace_elbo": pyro.infer.Trace_ELBO,
        "mean_field": pyro.infer.TraceMeanField_ELBO,
        "trace_enum": pyro.infer.TraceEnum_ELBO,
    }
    if objective not in classes:
        raise ValueError(f"unknown objective {objective!r}: expected {' | '.join(OBJECTIVES)}")
    return classes[objective](
        num_particles=num_particles,
        vectorize_particles=num_particles > 1,
        max_plate_nesting=MAX_PLATE_NESTING,
    )


class LatentScale(Messenger):
    """β on the latent sample sites only (observed sites keep weight 1): what
    `poutine.scale(beta)` around `pyro.sample("z", ...)` does inside `pyrovae.VAE`, for a
    program whose latent sites the caller does not know by name. β = 0 masks them."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and not msg["is_observed"]:
            if self.beta == 0.0:
                msg["mask"] = False
            else:
                msg["scale"] = self.beta * msg["scale"]


def data_program(fn: Callable) -> Callable:
    r"""`fn(x)` (a user's Pyro model or guide over a whole batch in `pyro.plate("data")`)
    as `program(x, n_data, beta)`, the signature of `pyrovae.VAE.model`.

    A minibatch of $B$ of $N$ points is scored with every site scaled by $N/B$
    (`poutine.scale`): for sites that are all per-datapoint (inside the data plate, which
    `pyrovae.build.check_program` verifies) the loss is then an unbiased estimate of the
    full-data negative ELBO, $E_{	ext{batch}}[rac{N}{B}\sum_{b} \ell(x_b)] = \sum_{n} \ell(x_n)$,
    exactly what a subsampled `pyro.plate("data", N, subsample=...)` gives. β scales the latent
    sites (`LatentScale`).
    """

    def program(x: torch.Tensor, n_data: int | None = None, beta: float = 1.0):
        scale = 1.0 if n_data is None else n_data / x.shape[0]
        with poutine.scale(scale=scale), LatentScale(beta):
            return fn(x)

    program.__name__ = getattr(fn, "__name__", "program")
    return program


def programs(model: torch.nn.Module) -> tuple[Callable, Callable]:
    """`(model, guide)` with the signature `(x, n_data=None, beta=1.0)`: a `pyrovae.VAE`'s
    or a structured model's own methods (the latter also take `y=`), or a plugin model's
    wrapped by `data_program`."""
    if isinstance(model, (VAE, *STRUCTURED.values())):
        return model.model, model.guide
    return data_program(model.model), data_program(model.guide)


#: `loss(x, n_data, beta, generator, y=None)`: the loss per datapoint of a minibatch `x` of
#: `n_data` (`y`: the batch's labels, used by structured models with `uses_labels = True`)
Loss = Callable[..., torch.Tensor]


def make_loss(
    model: torch.nn.Module, objective: str, num_particles: int = 1, capturable: bool = False
) -> Loss:
    r"""The training loss per datapoint for `model`, as the trainer calls it.

    A VAE (anything with Pyro `model`/`guide` methods, see `programs`): the chosen ELBO's
    `differentiable_loss(model, guide, x, N, beta) / N`, the negative (β-)ELBO estimate in
    nats per datapoint. A structured model with `uses_labels = True`
    (`pyrovae.structured`) gets the batch's labels too, `loss(x, N, beta, gen, y)` calling
    `differentiable_loss(model, guide, x, n_data=N, beta=beta, y=y)`: still the one ELBO. The autoencoder baseline (no Pyro program): its own
    reconstruction loss `model.loss(x, generator)`. `capturable=True`: the same estimator
    with no host reads (`make_elbo`), what `train.cuda_graph` records.
    """
    if not hasattr(model, "guide"):
        return lambda x, n_data, beta, gen, y=None: model.loss(x, gen)
    elbo = make_elbo(objective, num_particles, capturable)
    model_fn, guide_fn = programs(model)
    if getattr(model, "uses_labels", False):  # a structured model: the batch's labels as `y`

        def labelled(x, n_data, beta, gen=None, y=None) -> torch.Tensor:
            return elbo.differentiable_loss(model_fn, guide_fn, x, n_data=n_data, beta=beta, y=y) / n_data

        labelled.elbo = elbo  # type: ignore[attr-defined]
        return labelled

    def loss(x: torch.Tensor, n_data: int, beta: float, gen=None, y=None) -> torch.Tensor:
        return elbo.differentiable_loss(model_fn, guide_fn, x, n_data=n_data, beta=beta) / n_data

    loss.elbo = elbo  # type: ignore[attr-defined]
    return loss


def kl_scale(beta: float, warmup_epochs: int, progress_epochs: float) -> float:
    r"""β times a linear warm-up, $\beta \min(1, t / T_\text{warm-up})$ with $t$ in epochs
    (fractional: it rises every step), so the KL term is switched on gradually (Bowman et al.
    2016; Sønderby et al. 2016)."""
    if warmup_epochs <= 0:
        return beta
    return beta * min(1.0, progress_epochs / warmup_epochs)
