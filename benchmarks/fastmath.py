r"""A benchmark finding, not library code: softplus and the Bernoulli log-density without ATen's
unvectorized ``log1p`` (torch 2.14, AVX512 CPU kernels).

This module lived in the library until the redesign that put every training step through Pyro's
own ELBOs; it is kept here, with ``fastmath_kernels.py``, as the evidence for an upstream report
(ATen's float32 ``log1p`` is scalar in its AVX512 CPU kernels). Nothing in ``pyrovae`` imports it.

On the CPU with its AVX512 kernels (the default on AVX512 machines), ATen
evaluates :math:`\log(1 + e^{x})` in ``softplus``, ``log_sigmoid`` and
``binary_cross_entropy_with_logits`` with a float32 ``log1p`` that is not vectorized, while ``exp``
and ``log`` are: a 128 × 400 ``softplus`` takes ≈ 0.25 ms and a 128 × 784
``binary_cross_entropy_with_logits`` ≈ 0.5 ms on 2 threads, about 1 ms of the 7 ms step of the
benchmark VAE (``benchmarks/train_speed.py``; ``docs/benchmarks.md``). Here the same functions
are computed from vectorized ``exp`` and ``log`` with the classic correction for the rounding of
:math:`u = \mathrm{fl}(1 + t)`:

.. math::  \log(1 + t) = \log u - \frac{(u - 1) - t}{u}, \qquad t = e^{-|x|} \in (0, 1],

which is exact up to the rounding of ``log`` and of the division, because :math:`(u - 1) - t` is
exactly the rounding error of :math:`1 + t` (Fast2Sum). Then

.. math::  \mathrm{softplus}(x) = \max(x, 0) + \log(1 + e^{-|x|}), \qquad
           \log \mathrm{Bernoulli}(y \mid \sigma(\ell)) = y\,\ell - \mathrm{softplus}(\ell),

with gradients :math:`\sigma(x)` and :math:`y - \sigma(\ell)`. Accuracy: at most 1.45 ulp from the
float64 value measured (ATen's own softplus: 1.27 ulp; the tests allow 3), ``inf``/``nan`` as
ATen's (``fastmath_kernels.py`` prints the accuracy). 2.4–2.9× faster forward, 1.5–2.0× forward + backward on
50,000–100,000 elements (``benchmarks/fastmath_kernels.py``).

They are used only where they pay (:func:`_fast`): float32 CPU tensors of at least
:data:`MIN_NUMEL` elements when ATen runs its AVX512 kernels (:data:`SCALAR_LOG1P`), whose
``log1p`` is not vectorized. With AVX2 kernels ATen's ``log1p`` is vectorized and faster than the
composite here (set ``ATEN_CPU_CAPABILITY=avx2`` before importing torch to get them for the whole
process); on CUDA ATen's kernels are fused. Everywhere else the torch function runs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

#: ATen's ``log1p`` is not vectorized in its AVX512 CPU kernels (torch 2.14, measured: a 128 × 400
#: ``log1p`` takes 224 µs with the AVX512 kernels, 41 µs with ``ATEN_CPU_CAPABILITY=avx2``);
#: elsewhere ATen's own functions are faster than the kernels here, which are then not used.
SCALAR_LOG1P = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
#: below this many elements the fixed cost of the ≈ 12 small ops here exceeds the saving
#: (forward + backward, ``benchmarks/fastmath_kernels.py``: softplus breaks even near 8,000
#: elements, the Bernoulli log-density, whose ATen backward is cheaper, near 25,000)
MIN_NUMEL = {"softplus": 8192, "bernoulli": 32768}
#: float32 only: ATen's float64 ``log1p`` is vectorized, and its softplus faster than the composite
#: (51,200 elements, 2 threads: 107 against 214 µs forward; ``fastmath_kernels.py --dtype float64``);
#: the kernels themselves are exact in float64 too (tested)
DTYPES = (torch.float32,)


#: inside ``torch.func`` transforms (a private torch function; if it ever goes, assume not)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def _fast(x: torch.Tensor, kernel: str) -> bool:
    """Use the kernels here: a large float32 CPU tensor, where ATen's ``log1p`` is slow,
    outside ``torch.func`` transforms (which would need a vmap rule: ``torch.func.jacrev`` of a
    network uses ATen's functions)."""
    return (
        SCALAR_LOG1P
        and x.device.type == "cpu"
        and x.dtype in DTYPES
        and x.numel() >= MIN_NUMEL[kernel]
        and not _functorch_active()
    )


def _needs_grad(*xs: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _log1p_exp_neg_abs(x: torch.Tensor) -> torch.Tensor:
    r""":math:`\log(1 + e^{-|x|})`, a new tensor."""
    t = x.abs().neg_().exp_()
    u = t + 1.0
    correction = (u - 1.0).sub_(t).div_(u)
    del t  # freed before the log: at most three buffers of x's size alive at once
    return u.log_().sub_(correction)


def _softplus(x: torch.Tensor) -> torch.Tensor:
    return _log1p_exp_neg_abs(x).add_(x.clamp(min=0))


def _bernoulli_log_prob(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return _softplus(logits).neg_().addcmul_(logits, value)


#: without autograd, tensors above this many elements are processed in dim-0 slices of about this
#: size, so the temporaries stay small (evaluation scores 16,384 × 784 chunks at once)
SLICE_NUMEL = 1 << 20


def _sliced(f, *xs: torch.Tensor) -> torch.Tensor:
    """``f(*xs)`` for same-shaped ``xs``, computed on slices along dim 0 into one output tensor:
    the same values (``f`` is elementwise), temporaries of ≈ ``SLICE_NUMEL`` elements."""
    x = xs[0]
    if x.numel() <= SLICE_NUMEL or x.dim() == 0 or x.shape[0] == 1:
        return f(*xs)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    step = max(1, x.shape[0] * SLICE_NUMEL // x.numel())
    for i in range(0, x.shape[0], step):
        out[i : i + step] = f(*(t[i : i + step] for t in xs))
    return out


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
        d_logits = (value - torch.sigmoid(logits)).mul_(grad) if ctx.needs_input_grad[0] else None
        d_value = grad * logits if ctx.needs_input_grad[1] else None
        return d_logits, d_value


def softplus(x: torch.Tensor) -> torch.Tensor:
    r""":math:`\log(1 + e^{x})` (``torch.nn.functional.softplus`` with ``beta = 1``), faster on CPU."""
    if not _fast(x, "softplus"):
        return F.softplus(x)
    return _Softplus.apply(x) if _needs_grad(x) else _sliced(_softplus, x)


def bernoulli_log_prob(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    r""":math:`y\,\ell - \mathrm{softplus}(\ell)` elementwise, i.e.
    ``-binary_cross_entropy_with_logits(logits, value, reduction="none")``, faster on CPU.
    ``logits`` and ``value`` must have the same shape (``broadcast_all`` them first)."""
    if not (
        _fast(logits, "bernoulli") and value.dtype == logits.dtype and value.device == logits.device
    ):
        return -F.binary_cross_entropy_with_logits(logits, value, reduction="none")
    if _needs_grad(logits, value):
        return _BernoulliLogProb.apply(logits, value)
    return _sliced(_bernoulli_log_prob, logits, value)


class Softplus(nn.Module):
    """The ``softplus`` activation of the networks (``activation = "softplus"``): :func:`softplus`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softplus(x)
