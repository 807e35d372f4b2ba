"""Networks keep arbitrary leading dims and produce exactly the data's shape."""

from __future__ import annotations

import math

import pytest
import torch

from pyrovae import ConfigError
from pyrovae.networks import NETWORKS, Conv, build_network, forward_concat


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (3, 32, 32), (1, 7, 9)])
@pytest.mark.parametrize("params", [1, 2])
def test_conv_encoder_decoder_shapes(shape, params):
    """Encoder: image -> vector; decoder: vector -> `params` values per pixel, exactly the
    image size (odd sizes too), with (particles, batch) leading dims kept."""
    c, h, w = shape
    d = math.prod(shape)
    enc = build_network(Conv.Spec(), shape, (10,))
    dec = build_network(Conv.Spec(), (5,), (params * c, h, w))
    x = torch.rand(3, 4, d)  # (particles, batch, D)
    assert enc(x).shape == (3, 4, 10)
    assert dec(torch.randn(3, 4, 5)).shape == (3, 4, params * d)
    # the leading dims are a batch: each (particle, point) is mapped on its own
    torch.testing.assert_close(enc(x)[1, 2], enc(x[1, 2][None])[0])


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_dense_networks(kind):
    net = build_network(NETWORKS[kind].Spec(), (1, 8, 8), (7,))
    x = torch.rand(2, 5, 64)
    assert net(x).shape == (2, 5, 7)
    torch.testing.assert_close(net(x)[1, 3], net(x[1, 3]))


def test_linear_has_no_hidden_layer():
    net = build_network(NETWORKS["linear"].Spec(), (64,), (3,))
    assert sum(p.numel() for p in net.parameters()) == 64 * 3 + 3
    x = torch.rand(4, 64)
    torch.testing.assert_close(net(x), x @ net.weight.T + net.bias)  # one affine map


def test_mlp_activation_choice():
    net = build_network(NETWORKS["mlp"].Spec(hidden=[4, 4], activation="tanh"), (6,), (2,))
    assert sum(isinstance(m, torch.nn.Tanh) for m in net.modules()) == 2
    assert [m.out_features for m in net if isinstance(m, torch.nn.Linear)] == [4, 4, 2]


@pytest.mark.parametrize(
    "in_shape,out_shape", [((64,), (3,)), ((1, 8, 8), (1, 8, 8))], ids=["vectors", "images"]
)
def test_conv_needs_image_data_on_exactly_one_side(in_shape, out_shape):
    with pytest.raises(ConfigError) as e:
        build_network(Conv.Spec(), in_shape, out_shape, name="model.encoder")
    msg = str(e.value)
    assert msg.startswith('model.encoder: kind = "conv" needs image data')
    assert "(C, H, W)" in msg and f"input shape {in_shape}" in msg and 'kind = "mlp"' in msg


def test_vae_with_conv_on_vector_data_names_the_encoder():
    from pyrovae import VAE, load_config

    cfg = load_config({"model": {"encoder": {"kind": "conv"}, "decoder": {"kind": "conv"}}})
    with pytest.raises(ConfigError, match=r'^model\.encoder: kind = "conv" needs image data'):
        VAE(cfg.model, (4,))
    cfg = load_config({"model": {"decoder": {"kind": "conv"}}})
    with pytest.raises(ConfigError, match=r'^model\.decoder: kind = "conv" needs image data'):
        VAE(cfg.model, (4,))


def test_frozen_network_is_the_network_with_its_weights_as_buffers():
    from torch import nn

    from pyrovae.networks import Frozen

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Softplus(), nn.Linear(7, 3))
    frozen = Frozen(net)
    x = torch.randn(4, 5)
    torch.testing.assert_close(frozen(x), net(x))
    assert list(frozen.parameters()) == [] and set(frozen.state_dict()) == {
        "0_weight", "0_bias", "2_weight", "2_bias"}
    other = nn.Sequential(nn.Linear(5, 7), nn.Softplus(), nn.Linear(7, 3))
    frozen.load_weights(other.state_dict())
    torch.testing.assert_close(frozen(x), other(x))
    copy = Frozen(nn.Sequential(nn.Linear(5, 7), nn.Softplus(), nn.Linear(7, 3)))
    copy.load_state_dict(frozen.state_dict())  # saved and restored as the owner's buffers
    torch.testing.assert_close(copy(x), other(x))
    assert frozen.double()(x.double()).dtype == torch.float64  # moves with its owner


@pytest.mark.parametrize("kind", ["mlp", "linear", "conv"])
@pytest.mark.parametrize(
    "a_shape, b_shape",
    [((5, 12), (5, 4)), ((5, 12), (3, 1, 4)), ((3, 5, 12), (5, 4)), ((2, 1, 5, 12), (3, 1, 4))],
)
def test_forward_concat_is_the_network_on_the_concatenation(kind, a_shape, b_shape):
    """`forward_concat(net, a, b)` = `net([a, b])` with the batch dims broadcast (an enumerated
    label (3, 1, .) beside the points (5, .), importance samples beside a condition), in
    float64 to 1e-12, gradients included; a conv network (first layer not affine on the
    concatenation) takes the plain path."""
    torch.manual_seed(0)
    spec = NETWORKS[kind].Spec(**({"hidden": [7, 6]} if kind == "mlp" else {}))
    net = build_network(spec, (16,) if kind != "conv" else (1, 4, 4), (3,)).double()
    a = torch.randn(*a_shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(*b_shape, dtype=torch.float64, requires_grad=True)
    shape = torch.broadcast_shapes(a_shape[:-1], b_shape[:-1])
    ref = net(torch.cat([a.expand(*shape, 12), b.expand(*shape, 4)], -1))
    got = forward_concat(net, a, b)
    assert got.shape == (*shape, 3)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    g_ref = torch.autograd.grad(ref.square().sum(), [a, b, *net.parameters()])
    g_got = torch.autograd.grad(got.square().sum(), [a, b, *net.parameters()])
    for x, y in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
