"""pyrovae.fastmath: softplus and the Bernoulli log-density against torch's and float64 references.

Tolerance: the float64 value rounded to the tensor's dtype, within 3 ulp (the kernels are within
2 ulp by construction: a rounded log, a rounded division and the final additions); gradients
within a few ulp of the analytic ones; special values exactly as ATen's.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import small_vae
from torch.func import jacrev
from torch.nn import functional as F

from pyrovae import fastmath
from pyrovae.likelihoods import BernoulliLogits
from pyrovae.networks import MLP, NETWORKS
from pyrovae.objectives import make_elbo


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    """Exercise the kernels on any machine and at any size (in use they run only where they pay:
    AVX512 ATen kernels, float32, at least ``MIN_NUMEL`` elements; see ``test_dispatch``)."""
    monkeypatch.setattr(fastmath, "SCALAR_LOG1P", True)
    monkeypatch.setattr(fastmath, "MIN_NUMEL", {"softplus": 0, "bernoulli": 0})
    monkeypatch.setattr(fastmath, "DTYPES", (torch.float32, torch.float64))


def _wide(n: int = 200_000, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Values from 1e-30 to 1e3 in magnitude, both signs, plus a dense band around 0."""
    g = torch.Generator().manual_seed(seed)
    mag = 10 ** (torch.rand(n, generator=g, dtype=torch.float64) * 33 - 30)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    band = torch.randn(n, generator=g, dtype=torch.float64) * 5
    return torch.cat([mag * sign, band]).to(dtype)


def _ulp_error(approx: torch.Tensor, exact64: torch.Tensor) -> torch.Tensor:
    """|approx - exact| in units of the dtype's spacing at the exact value (normal numbers)."""
    finfo = torch.finfo(approx.dtype)
    spacing = exact64.abs().clamp_min(finfo.tiny) * finfo.eps
    return (approx.double() - exact64).abs() / spacing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softplus_within_3_ulp_of_float64(dtype):
    x = _wide(dtype=dtype)
    exact = F.softplus(x.double()) if dtype == torch.float32 else None
    if (
        dtype == torch.float64
    ):  # reference in higher precision: log1p on float64 is correct to 1 ulp
        exact = torch.logaddexp(x, torch.zeros_like(x))
    got = fastmath.softplus(x)
    normal = exact.abs() >= torch.finfo(dtype).tiny
    assert _ulp_error(got[normal], exact[normal]).max() <= 3
    assert (got[~normal] - exact[~normal]).abs().max() <= torch.finfo(dtype).tiny


def test_softplus_matches_torch_closely_and_special_values_exactly():
    x = _wide()
    torch.testing.assert_close(fastmath.softplus(x), F.softplus(x), rtol=3e-7, atol=1e-30)
    special = torch.tensor(
        [
            float("inf"),
            -float("inf"),
            float("nan"),
            0.0,
            -0.0,
            20.0,
            -20.0,
            88.0,
            -88.0,
            1e30,
            -1e30,
        ]
    )
    torch.testing.assert_close(fastmath.softplus(special), F.softplus(special), equal_nan=True)


def test_softplus_gradient_is_the_sigmoid():
    x = _wide(20_000).requires_grad_()
    fastmath.softplus(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.sigmoid(x.detach()), rtol=0, atol=0)
    y = x.detach().clone().requires_grad_()
    F.softplus(y).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=5e-7, atol=1e-30)  # a few ulp


def test_gradcheck_and_second_derivatives():
    x = torch.randn(8, dtype=torch.float64, requires_grad=True) * 4
    assert torch.autograd.gradcheck(fastmath.softplus, (x,))
    assert torch.autograd.gradgradcheck(fastmath.softplus, (x,))
    logits = torch.randn(8, dtype=torch.float64, requires_grad=True)
    value = torch.rand(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fastmath.bernoulli_log_prob, (logits, value))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bernoulli_log_prob_within_3_ulp_of_float64(dtype):
    logits = _wide(dtype=dtype, seed=1)
    y = (torch.rand(logits.shape, generator=torch.Generator().manual_seed(2)) < 0.5).to(dtype)
    exact = -F.binary_cross_entropy_with_logits(logits.double(), y.double(), reduction="none")
    got = fastmath.bernoulli_log_prob(logits, y)
    # where |log p| is far below the scale of its parts (y = 1, huge logits), compare absolutely
    scale = logits.double().abs().clamp_min(exact.abs())
    assert ((got.double() - exact).abs() / (scale * torch.finfo(dtype).eps)).max() <= 3


def test_bernoulli_log_prob_gradient_and_nan():
    logits = (torch.randn(64, 30) * 6).requires_grad_()
    y = (torch.rand(64, 30) < 0.3).float()
    fastmath.bernoulli_log_prob(logits, y).sum().backward()
    torch.testing.assert_close(logits.grad, y - torch.sigmoid(logits.detach()), rtol=0, atol=0)
    l2 = logits.detach().clone().requires_grad_()
    (-F.binary_cross_entropy_with_logits(l2, y, reduction="sum")).backward()
    torch.testing.assert_close(logits.grad, l2.grad, rtol=1e-6, atol=1e-7)
    # a NaN from the decoder must reach the loss (the trainer's rollback depends on it)
    bad = torch.tensor([0.0, float("nan")])
    assert fastmath.bernoulli_log_prob(bad, torch.tensor([1.0, 0.0])).isnan().tolist() == [
        False,
        True,
    ]


def test_dispatch(monkeypatch):
    """ATen's function (bit for bit) wherever the kernels do not pay."""
    big, small = torch.randn(128, 400) * 3, torch.randn(16, 50) * 3
    y = (torch.rand(128, 400) < 0.5).float()
    assert not torch.equal(fastmath.softplus(big), F.softplus(big))  # the kernel runs
    monkeypatch.setattr(fastmath, "MIN_NUMEL", {"softplus": 8192, "bernoulli": 8192})
    assert torch.equal(fastmath.softplus(small), F.softplus(small))
    assert not torch.equal(fastmath.softplus(big), F.softplus(big))
    monkeypatch.setattr(fastmath, "DTYPES", (torch.float32,))  # float64: ATen is faster
    big64 = big.double()
    assert torch.equal(fastmath.softplus(big64), F.softplus(big64))
    monkeypatch.setattr(fastmath, "SCALAR_LOG1P", False)  # e.g. ATen's AVX2 kernels
    assert torch.equal(fastmath.softplus(big), F.softplus(big))
    ref = -F.binary_cross_entropy_with_logits(big, y, reduction="none")
    assert torch.equal(fastmath.bernoulli_log_prob(big, y), ref)


def test_other_dtypes_and_transforms_use_torch():
    x = torch.randn(100).to(torch.bfloat16)
    assert torch.equal(fastmath.softplus(x), F.softplus(x))
    # torch.func transforms (the overcomplete lesson's jacrev) fall back to ATen's functions
    x = torch.randn(5)
    jac = jacrev(fastmath.softplus)(x)
    torch.testing.assert_close(jac, torch.diag(torch.sigmoid(x)))


def test_no_grad_and_grad_paths_give_the_same_values():
    x = torch.randn(50, 40) * 5
    with torch.no_grad():
        a = fastmath.softplus(x)
    b = fastmath.softplus(x.clone().requires_grad_())
    assert torch.equal(a, b.detach())


def test_bernoulli_likelihood_distribution_behaves_as_pyros():
    logits = torch.randn(3, 7, requires_grad=True)
    y = (torch.rand(3, 7) < 0.5).float()
    ours, theirs = BernoulliLogits(logits=logits), dist.Bernoulli(logits=logits)
    assert isinstance(ours, dist.Bernoulli)
    torch.testing.assert_close(ours.log_prob(y), theirs.log_prob(y), rtol=2e-7, atol=1e-7)
    # particles broadcast against the data, expand/to_event/mask keep the class
    many = BernoulliLogits(logits=torch.randn(5, 3, 7)).to_event(1)
    assert many.log_prob(y).shape == (5, 3)
    assert type(ours.expand([4, 3, 7])) is BernoulliLogits
    assert torch.equal(ours.mask(False).log_prob(y), torch.zeros(3, 7))
    with pytest.raises(ValueError, match="support"):
        BernoulliLogits(logits=logits, validate_args=True).log_prob(y + 0.5)


def test_softplus_networks_use_the_kernel():
    net = NETWORKS.build(MLP.Spec(hidden=[16], activation="softplus"), (10,), 4)
    assert isinstance(net[1], fastmath.Softplus)
    x = torch.randn(32, 10)
    ref = torch.nn.Sequential(net[0], torch.nn.Softplus(), net[2])
    torch.testing.assert_close(net(x), ref(x), rtol=1e-6, atol=1e-6)


def test_tensors_off_the_cpu_use_torch():
    """CUDA tensors take ATen's fused kernels; the 'meta' device stands in for them here."""
    x = torch.empty(4, 3, device="meta")
    assert fastmath.softplus(x).device.type == "meta"
    assert fastmath.bernoulli_log_prob(x, x).shape == (4, 3)


def test_large_tensors_without_autograd_are_sliced_with_the_same_values(monkeypatch):
    """Evaluation-sized inputs are processed in slices (bounded temporaries), bit for bit."""
    logits = torch.randn(37, 5, 11) * 4
    y = (torch.rand(5, 11) < 0.5).float().expand(37, 5, 11)  # broadcast data, as in evaluation
    whole_sp, whole_lp = fastmath.softplus(logits), fastmath.bernoulli_log_prob(logits, y)
    monkeypatch.setattr(fastmath, "SLICE_NUMEL", 100)
    assert torch.equal(fastmath.softplus(logits), whole_sp)
    assert torch.equal(fastmath.bernoulli_log_prob(logits, y), whole_lp)


def test_the_vae_objective_is_unchanged_by_the_kernels(monkeypatch):
    """Trace_ELBO's loss and gradients for a softplus/Bernoulli VAE, with the kernels (forced on
    at every size here) and with torch's functions: equal to float32 rounding."""
    torch.manual_seed(0)
    vae = small_vae(likelihood={"kind": "bernoulli"})
    vae.register_params = False
    x = (torch.rand(32, 64) < 0.4).float()

    def loss_and_grads():
        vae.zero_grad()
        pyro.set_rng_seed(7)
        loss = make_elbo("trace_elbo").differentiable_loss(vae.model, vae.guide, x, 1000)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in vae.parameters()]

    fast = loss_and_grads()
    monkeypatch.setattr(fastmath, "SCALAR_LOG1P", False)
    ref = loss_and_grads()
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-6, atol=0)
    for g_fast, g_ref in zip(fast[1], ref[1], strict=True):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-3)
