"""Networks keep arbitrary leading dims and produce exactly the data's shape."""

from __future__ import annotations

import math

import pytest
import torch

from pyrovae.networks import NETWORKS, Conv, build_network


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (3, 32, 32), (1, 7, 9)])
@pytest.mark.parametrize("params", [1, 2])
def test_conv_encoder_decoder_shapes(shape, params):
    d = math.prod(shape)
    enc = build_network(Conv.Spec(), shape, 10)
    dec = build_network(
        Conv.Spec(), (5,), params * d, out_shape=shape, out_channels_per_pixel=params
    )
    x = torch.rand(3, 4, d)  # (particles, batch, D)
    assert enc(x).shape == (3, 4, 10)
    assert dec(torch.randn(3, 4, 5)).shape == (3, 4, params * d)


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_dense_networks(kind):
    net = build_network(NETWORKS[kind].Spec(), (1, 8, 8), 7)
    assert net(torch.rand(2, 5, 64)).shape == (2, 5, 7)


def test_linear_has_no_hidden_layer():
    net = build_network(NETWORKS["linear"].Spec(), (64,), 3)
    assert sum(p.numel() for p in net.parameters()) == 64 * 3 + 3


def test_mlp_activation_choice():
    net = build_network(NETWORKS["mlp"].Spec(hidden=[4, 4], activation="tanh"), (6,), 2)
    assert sum(isinstance(m, torch.nn.Tanh) for m in net.modules()) == 2


def test_conv_needs_image_shape():
    with pytest.raises(ValueError, match="C, H, W"):
        build_network(Conv.Spec(), (64,), 3)
