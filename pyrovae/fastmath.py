r"""Softplus and the Bernoulli log-density for CPU training, without a scalar ``log1p``.

On the CPU, ATen evaluates :math:`\log(1 + e^{x})` in ``softplus``, ``log_sigmoid`` and
``binary_cross_entropy_with_logits`` with a scalar ``log1p`` per element, while ``exp`` and
``log`` are vectorized: a 128 × 400 ``softplus`` takes ≈ 0.25 ms and a 128 × 784
``binary_cross_entropy_with_logits`` ≈ 0.5 ms on 2 threads, about 1 ms of the 7 ms step of the
benchmark VAE (``benchmarks/train_speed.py``; ``docs/benchmarks.md``). Here the same functions
are computed from vectorized ``exp`` and ``log`` with the classic correction for the rounding of
:math:`u = \mathrm{fl}(1 + t)`:

.. math::  \log(1 + t) = \log u - \frac{(u - 1) - t}{u}, \qquad t = e^{-|x|} \in (0, 1],

which is exact up to the rounding of ``log`` and of the division, because :math:`(u - 1) - t` is
exactly the rounding error of :math:`1 + t` (Fast2Sum). Then

.. math::  \mathrm{softplus}(x) = \max(x, 0) + \log(1 + e^{-|x|}), \qquad
           \log \mathrm{Bernoulli}(y \mid \sigma(\ell)) = y\,\ell - \mathrm{softplus}(\ell),

with gradients :math:`\sigma(x)` and :math:`y - \sigma(\ell)`. Accuracy: within 2 ulp of the
float64 value (ATen's own: 1 ulp), ``inf``/``nan`` behave as ATen's (``tests/test_fastmath.py``).
About 2.5× faster forward, 1.6× forward + backward. Anything other than float32/float64 CPU
tensors (CUDA, where ATen's kernels are fused and fast, half precision) goes to the torch function.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _fast(x: torch.Tensor) -> bool:
    """Use the kernels here: a float32/float64 CPU tensor, outside ``torch.func`` transforms (which
    would need a vmap rule; ``torch.func.jacrev`` of a network then uses ATen's functions)."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and not torch._C._are_functorch_transforms_active()
    )


def _needs_grad(*xs: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _log1p_exp_neg_abs(x: torch.Tensor) -> torch.Tensor:
    r""":math:`\log(1 + e^{-|x|})`, a new tensor."""
    t = x.abs().neg_().exp_()
    u = t + 1.0
    correction = (u - 1.0).sub_(t).div_(u)
    return u.log_().sub_(correction)


def _softplus(x: torch.Tensor) -> torch.Tensor:
    return _log1p_exp_neg_abs(x).add_(x.clamp(min=0))


def _bernoulli_log_prob(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return _softplus(logits).neg_().addcmul_(logits, value)


# One autograd node each (instead of the ≈ 10 of the composite). The ``forward(ctx, ...)`` form:
# the ``setup_context`` form would run ``inspect.signature`` on every call (≈ 20 µs).
class _Softplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return _softplus(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


class _BernoulliLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits, value)
        return _bernoulli_log_prob(logits, value)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        logits, value = ctx.saved_tensors
        d_logits = grad * (value - torch.sigmoid(logits)) if ctx.needs_input_grad[0] else None
        d_value = grad * logits if ctx.needs_input_grad[1] else None
        return d_logits, d_value


def softplus(x: torch.Tensor) -> torch.Tensor:
    r""":math:`\log(1 + e^{x})` (``torch.nn.functional.softplus`` with ``beta = 1``), faster on CPU."""
    if not _fast(x):
        return F.softplus(x)
    return _Softplus.apply(x) if _needs_grad(x) else _softplus(x)


def bernoulli_log_prob(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    r""":math:`y\,\ell - \mathrm{softplus}(\ell)` elementwise, i.e.
    ``-binary_cross_entropy_with_logits(logits, value, reduction="none")``, faster on CPU.
    ``logits`` and ``value`` must have the same shape (``broadcast_all`` them first)."""
    if not (_fast(logits) and value.dtype == logits.dtype and value.device == logits.device):
        return -F.binary_cross_entropy_with_logits(logits, value, reduction="none")
    if _needs_grad(logits, value):
        return _BernoulliLogProb.apply(logits, value)
    return _bernoulli_log_prob(logits, value)


class Softplus(nn.Module):
    """The ``softplus`` activation of the networks (``activation = "softplus"``): :func:`softplus`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softplus(x)
