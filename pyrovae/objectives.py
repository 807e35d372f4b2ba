r"""Training objectives: which ``pyro.infer`` ELBO, and the β / KL warm-up schedule.

* ``trace_elbo`` (``Trace_ELBO``; computed by :class:`LeanTrace_ELBO`, bit-identical): :math:`\frac1K\sum_k \log p(x,z_k) - \log q(z_k|x)`,
  :math:`z_k\sim q`;
* ``mean_field`` (``TraceMeanField_ELBO``; computed by :class:`LeanTraceMeanField_ELBO`,
  bit-identical): :math:`E_q\log p(x|z) - \mathrm{KL}(q\|p)` with the KL analytic where registered;
* ``iwae`` (``RenyiELBO(alpha=0)``): :math:`\log \frac1K\sum_k p(x,z_k)/q(z_k|x)`
  (Burda et al. 2015).

All three are per-datapoint bounds on :math:`\log p(x)`; ``RenyiELBO`` keeps the plates shared by
all sites, so with ``pyro.plate("data")`` the IWAE bound is taken per datapoint (BRIEF §5).
"""

from __future__ import annotations

import math

import pyro.infer
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

#: every pyrovae model has one plate ("data"); vectorized particles go to the dim left of it
MAX_PLATE_NESTING = 1


class LeanTrace_ELBO(pyro.infer.Trace_ELBO):
    """``Trace_ELBO`` with the same loss and gradient, minus the generic per-step machinery.

    Still runs the Pyro program: the guide under ``poutine.trace`` and the model under
    ``poutine.trace(poutine.replay(model, guide_trace))``, and scores each sample site with its own
    distribution, scaled by its plates (``scale_and_mask``). What it drops, for the case where every
    guide site is reparameterized and there is one particle:

    * ``prune_subsample_sites`` (two trace copies per step): subsample sites are skipped instead;
    * ``compute_score_parts`` / ``ScoreParts`` objects: for reparameterized sites the surrogate
      term is the log-density itself (``entropy_term == log_prob``), so it is used directly;
    * the structural validation (``check_model_guide_match``, ``check_site_shape``,
      ``check_if_enumerated``) runs when the trace structure (site names, shapes, plates) is new,
      i.e. on the first step, instead of every step;
    * ``warn_if_nan``/``warn_if_inf`` on every site (each registers a backward hook): the trainer
      already stops on a non-finite loss; here the sites are examined only when the loss is not finite.

    Anything else (score-function guide sites, enumeration, several particles) falls back to
    ``Trace_ELBO.differentiable_loss``. The returned tensor is computed exactly as Trace_ELBO does
    (``-elbo + (surrogate - surrogate.item())``, same summation order), so losses and gradients are
    bit-identical.

    With ``sync_free = True`` (set by the trainer on CUDA) it returns ``-surrogate`` itself: the
    same gradient, the same value up to float32 rounding (the sum is taken on the device instead of
    in Python floats), and no ``.item()``, each of which would wait for the GPU.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._validated: object = None
        #: return the surrogate itself, with no ``.item()`` (each is a host synchronization on
        #: CUDA); for reparameterized sites it equals the ELBO up to float32 summation order
        self.sync_free = False

    @staticmethod
    def _signature(model_trace, guide_trace) -> tuple:
        """Site names, value shapes and plates: what the structural checks depend on."""
        return tuple(
            (
                name,
                site["value"].shape if torch.is_tensor(site["value"]) else None,
                site["cond_indep_stack"],
            )
            for tr in (model_trace, guide_trace)
            for name, site in tr.nodes.items()
            if site["type"] == "sample"
        )

    def _validate_once(self, model_trace, guide_trace) -> None:
        """Trace_ELBO's per-step structural checks, run once per new trace structure."""
        from pyro.util import check_if_enumerated, check_model_guide_match, check_site_shape

        key = self._signature(model_trace, guide_trace)
        if key == self._validated:
            return
        check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
        check_if_enumerated(guide_trace)
        for site in model_trace.nodes.values():
            if site["type"] == "sample" and not site_is_subsample(site):
                check_site_shape(site, self.max_plate_nesting)
        self._validated = key

    @staticmethod
    def _score(trace, site) -> torch.Tensor:
        try:
            lp = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
        except ValueError as e:  # as Trace.compute_log_prob: name the site, show the shapes
            shapes = trace.format_shapes(last_site=site["name"])
            raise ValueError(
                f"Error while computing log_prob at site '{site['name']}':\n{e}\n{shapes}"
            ) from e
        lp = site["log_prob"] = scale_and_mask(lp, site["scale"], site["mask"])
        site["log_prob_sum"] = lp = lp.sum()
        return lp

    def _run(self, model, guide, args, kwargs):
        """Guide trace, then the model replayed against it: ``(model_trace, guide_trace,
        guide_sites)``, or None where the lean path does not apply (several particles, a guide
        site that is not reparameterized or is enumerated): the caller then defers to Pyro."""
        if self.num_particles != 1 or self.vectorize_particles:
            return None
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        guide_sites = [
            s
            for s in guide_trace.nodes.values()
            if s["type"] == "sample" and not site_is_subsample(s)
        ]
        if any(
            not getattr(s["fn"], "has_rsample", False) or s["infer"].get("enumerate")
            for s in guide_sites
        ):
            return None
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        return model_trace, guide_trace, guide_sites

    def differentiable_loss(self, model, guide, *args, **kwargs):
        traces = self._run(model, guide, args, kwargs)
        if traces is None:
            return super().differentiable_loss(model, guide, *args, **kwargs)
        model_trace, guide_trace, guide_sites = traces
        # same summation order as Trace_ELBO._differentiable_loss_particle: model sites, then guide
        # sites; with sync_free the Python-float ELBO (one .item() per site) is skipped
        read = not self.sync_free
        elbo, surrogate = 0, 0
        for site in model_trace.nodes.values():
            if site["type"] == "sample" and not site_is_subsample(site):
                lp = self._score(model_trace, site)
                elbo = elbo + lp.item() if read else elbo
                surrogate = surrogate + lp
        for site in guide_sites:
            lp = self._score(guide_trace, site)
            elbo = elbo - lp.item() if read else elbo
            surrogate = surrogate - lp
        if is_validation_enabled():
            self._validate_once(model_trace, guide_trace)
        if not read:
            return -surrogate
        loss = -elbo
        if not math.isfinite(loss) and is_validation_enabled():
            from pyro.util import warn_if_inf, warn_if_nan

            for tr in (model_trace, guide_trace):
                for name, site in tr.nodes.items():
                    if "log_prob_sum" in site:
                        warn_if_nan(site["log_prob_sum"], f"log_prob_sum at site '{name}'")
                        warn_if_inf(
                            site["log_prob_sum"],
                            f"log_prob_sum at site '{name}'",
                            allow_neginf=True,
                        )
        surrogate_loss = -surrogate
        return loss + (surrogate_loss - surrogate_loss.item())


class LeanTraceMeanField_ELBO(LeanTrace_ELBO, pyro.infer.TraceMeanField_ELBO):
    r"""``TraceMeanField_ELBO`` with the same loss and gradient, minus the unused work.

    Per datapoint :math:`\log p(x\mid z) - \mathrm{KL}(q(z\mid x)\,\|\,p(z))`, :math:`z\sim q`,
    with the KL in closed form where ``torch.distributions.kl_divergence`` has it (the standard
    normal and learned normal priors against the Gaussian guide) and :math:`\log p(z)-\log q(z)`
    otherwise, exactly as Pyro's ``TraceMeanField_ELBO._differentiable_loss_particle`` sums them.
    Pyro's version also computes, every step, the log-densities of the latent site under model and
    guide that the analytic KL makes unused, the trace copies and ``ScoreParts`` of
    ``get_importance_trace``, a NaN hook, and the structural checks; here only what enters the
    loss is computed and the structural checks (with the mean-field site-order check) run once per
    trace structure, as in :class:`LeanTrace_ELBO`. No ``.item()`` with ``sync_free``.
    Falls back to ``TraceMeanField_ELBO`` for several particles, non-reparameterized or enumerated
    guide sites, and guide-only (auxiliary) sites.
    """

    def differentiable_loss(self, model, guide, *args, **kwargs):
        traces = self._run(model, guide, args, kwargs)
        if traces is None or any(s["name"] not in traces[0].nodes for s in traces[2]):
            return pyro.infer.TraceMeanField_ELBO.differentiable_loss(
                self, model, guide, *args, **kwargs
            )
        model_trace, guide_trace, _ = traces
        elbo = 0
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if site["is_observed"]:
                elbo = elbo + self._score(model_trace, site)
                continue
            q = guide_trace.nodes[name]
            try:
                kl = kl_divergence(q["fn"], site["fn"])
            except NotImplementedError:  # Monte Carlo: log p(z) - log q(z)
                elbo = elbo + self._score(model_trace, site) - self._score(guide_trace, q)
                continue
            kl = scale_and_mask(kl, scale=q["scale"], mask=q["mask"])
            if torch.is_tensor(kl):
                kl_sum = kl.sum()
            else:
                kl_sum = kl * torch.Size(q["fn"].batch_shape).numel()
            elbo = elbo - kl_sum
        if is_validation_enabled():
            self._validate_once(model_trace, guide_trace)
        if self.sync_free:
            return -elbo
        # Trace_ELBO.differentiable_loss's float + (surrogate - surrogate.item()), bit for bit
        loss = -elbo.item()
        surrogate_loss = -elbo
        return loss + (surrogate_loss - surrogate_loss.item())

    def _validate_once(self, model_trace, guide_trace) -> None:
        key = self._signature(model_trace, guide_trace)
        if key != self._validated:
            from pyro.infer.trace_mean_field_elbo import _check_mean_field_requirement

            _check_mean_field_requirement(model_trace, guide_trace)
            with torch.no_grad():  # the shape check reads log p(z), which the KL made unused
                for site in model_trace.nodes.values():
                    missing = site["type"] == "sample" and "log_prob" not in site
                    if missing and not site_is_subsample(site):
                        self._score(model_trace, site)
        super()._validate_once(model_trace, guide_trace)


def direct_loss_applies(vae, x: torch.Tensor, n_data: int | None) -> bool:
    """Whether :func:`direct_loss` computes exactly what the Pyro program does: run the guide and
    the replayed model once under ``poutine.trace`` and check that their only sample sites are the
    ones ``direct_loss`` evaluates (guide: ``z``; model: ``z``, then the observed ``x``) and that
    ``z`` is reparameterized. A prior, likelihood or guide that adds Pyro sites of its own (a
    hierarchical prior, say) fails the check and keeps the trainer on the Pyro program."""
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices):  # leaves the random stream untouched
        g = poutine.trace(vae.guide).get_trace(x, n_data)
        m = poutine.trace(poutine.replay(vae.model, trace=g)).get_trace(x, n_data)

    def sites(tr):
        return [
            (n, s["is_observed"])
            for n, s in tr.nodes.items()
            if s["type"] == "sample" and not site_is_subsample(s)
        ]

    params = any(s["type"] == "param" for tr in (g, m) for s in tr.nodes.values())
    return (
        sites(g) == [("z", False)]
        and sites(m) == [("z", False), ("x", True)]
        and getattr(g.nodes["z"]["fn"], "has_rsample", False)
        and not params
    )


def direct_loss(vae, x: torch.Tensor, n_data: int | None, objective: str, sync_free: bool = False):
    r"""The loss :class:`LeanTrace_ELBO` (``objective = "trace_elbo"``) or
    :class:`LeanTraceMeanField_ELBO` (``"mean_field"``) computes for ``vae.model``/``vae.guide``,
    without running them through Pyro's effect handlers: the fast path of ``train.fast_path``.

    It evaluates the program's own pieces in the program's order, with the same random draw:

    .. math::  q = q_\phi(\cdot\mid x),\; z = q.\mathrm{rsample}(),\; p = p(z)\ \text{expanded to the plate},
               \; \ell = \log p_\theta(x\mid z)

    and scales each site's log-density by what ``pyro.plate`` and ``poutine.scale``/``mask`` would
    (:math:`\beta` on ``z``, then :math:`N/B` for a subsampled plate), summed in Trace_ELBO's site
    order: model ``z``, model ``x``, guide ``z`` (``trace_elbo``); :math:`-\mathrm{KL}(q\|p)` (analytic
    where registered, else :math:`\log p(z) - \log q(z)`) then ``x`` (``mean_field``). Loss and
    gradients equal the Pyro path's bit for bit (``tests/test_fast_path.py``, every prior, likelihood
    and guide kind). What it does not do is what the trainer switches off on these steps anyway:
    Pyro's validation (structure, arguments, supports). Returns ``None`` where it does not apply
    (another objective, several particles): the caller then runs the Pyro program.
    """
    if objective not in ("trace_elbo", "mean_field"):
        return None
    b = x.shape[0]
    beta = vae.kl_scale
    # poutine.scale(beta) / poutine.mask(False) on z (VAE._kl_weight), then the plate's N / B
    z_scale, z_mask = (1.0, False) if beta == 0.0 else (float(beta), None)
    x_scale = 1.0
    if n_data is not None and n_data != b:
        z_scale, x_scale = z_scale * n_data / b, x_scale * n_data / b
    q = vae.posterior(x)
    if not q.has_rsample:
        return None
    z = q.rsample()
    p = vae.prior()
    if p.batch_shape != (b,):  # what pyro.plate's broadcast does to the prior
        p = p.expand(torch.Size([b]))
    lik = vae.likelihood(vae._unflatten(vae.decoder(z)))

    def score(d, value, scale, mask=None):
        return scale_and_mask(d.log_prob(value), scale, mask).sum()

    if objective == "mean_field":
        try:
            kl = scale_and_mask(kl_divergence(q, p), scale=z_scale, mask=z_mask)
            elbo = 0 - kl.sum()
        except NotImplementedError:  # Monte Carlo: log p(z) - log q(z)
            elbo = 0 + score(p, z, z_scale, z_mask) - score(q, z, z_scale, z_mask)
        elbo = elbo + score(lik, x, x_scale)
        if sync_free:
            return -elbo
        loss = -elbo.item()
        surrogate_loss = -elbo
        return loss + (surrogate_loss - surrogate_loss.item())
    lpz, lpx = score(p, z, z_scale, z_mask), score(lik, x, x_scale)
    lqz = score(q, z, z_scale, z_mask)
    surrogate = 0 + lpz + lpx - lqz
    if sync_free:
        return -surrogate
    loss = -(0 + lpz.item() + lpx.item() - lqz.item())
    surrogate_loss = -surrogate
    return loss + (surrogate_loss - surrogate_loss.item())


def make_elbo(objective: str = "trace_elbo", num_particles: int = 1) -> pyro.infer.ELBO:
    """The ``pyro.infer`` ELBO for ``train.objective`` with ``num_particles`` samples (vectorized)."""
    kw = dict(
        num_particles=num_particles,
        vectorize_particles=num_particles > 1,
        max_plate_nesting=MAX_PLATE_NESTING,
    )
    if objective == "trace_elbo":
        return LeanTrace_ELBO(**kw)
    if objective == "mean_field":
        return LeanTraceMeanField_ELBO(**kw)
    if objective == "iwae":
        return pyro.infer.RenyiELBO(alpha=0.0, **kw)
    raise ValueError(f"unknown objective {objective!r}: expected trace_elbo | mean_field | iwae")


def kl_scale(beta: float, warmup_epochs: int, progress_epochs: float) -> float:
    r"""β times a linear warm-up: :math:`\beta \min(1, t / T_\text{warm-up})` with ``t`` in epochs
    (fractional: it rises every step), so the KL term is switched on gradually (Bowman et al. 2016;
    Sønderby et al. 2016)."""
    if warmup_epochs <= 0:
        return beta
    return beta * min(1.0, progress_epochs / warmup_epochs)
