"""Encoder and decoder networks: `mlp`, `conv` and `linear`.

Every network is built the same way, `NETWORKS.build(spec, in_shape, out_shape)`, and maps a
tensor with arbitrary leading (batch/particle) dimensions and a flat trailing feature dimension
`prod(in_shape)` to one with trailing dimension `prod(out_shape)`. Image shapes such as
`(1, 28, 28)` matter only to `conv`, which reshapes internally, so the Pyro model always sees
flat vectors `(..., D)`. A decoder for a likelihood with `k` parameters per feature has
`out_shape = (k * C, H, W)` for images and `(k * D,)` for vectors.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from pyrovae.errors import ConfigError
from pyrovae.registry import Registry, Spec

Activation = Literal["relu", "softplus", "tanh", "elu", "gelu", "leaky_relu", "sigmoid"]
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
    "sigmoid": nn.Sigmoid,
}

NETWORKS: Registry[nn.Module] = Registry("network", group="pyrovae.networks", base=nn.Module)


@NETWORKS.register
class MLP(nn.Sequential):
    """Fully connected network `in -> hidden[0] -> ... -> out` with an activation between layers."""

    class Spec(Spec):
        kind: Literal["mlp"] = "mlp"
        hidden: list[int] = [256, 128]
        activation: Activation = "softplus"

    def __init__(self, spec: MLP.Spec, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        sizes = [math.prod(in_shape), *spec.hidden, math.prod(out_shape)]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(_ACTIVATIONS[spec.activation]())
        super().__init__(*layers)


@NETWORKS.register
class Linear(nn.Linear):
    """A single affine map (no hidden layer): the linear autoencoder / pPCA of the lessons."""

    class Spec(Spec):
        kind: Literal["linear"] = "linear"

    def __init__(
        self, spec: Linear.Spec, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
    ) -> None:
        super().__init__(math.prod(in_shape), math.prod(out_shape))


def _conv_sizes(size: int, n: int) -> list[int]:
    """Spatial sizes after `n` stride-2 convolutions (kernel 3, padding 1): ceil(s / 2)."""
    sizes = [size]
    for _ in range(n):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


@NETWORKS.register
class Conv(nn.Module):
    """Convolutional encoder (image -> vector) or decoder (vector -> image).

    Encoder: stride-2 3x3 convolutions with `channels` filters, then a linear layer.
    Decoder: the mirror image, transposed convolutions with `output_padding` chosen so the
    output is exactly the image shape `(C, H, W)` for any size (8x8, 28x28, 32x32, ...).
    Whether it is an encoder or a decoder is decided by which side has an image shape; a
    `ConfigError` if neither (or both) has one.
    """

    class Spec(Spec):
        kind: Literal["conv"] = "conv"
        channels: list[int] = [32, 64]
        activation: Activation = "relu"

    def __init__(
        self, spec: Conv.Spec, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
    ) -> None:
        super().__init__()
        act = _ACTIVATIONS[spec.activation]
        self.decoder = len(out_shape) == 3
        if self.decoder == (len(in_shape) == 3):
            raise ConfigError(
                'kind = "conv" needs image data: expected points of shape (C, H, W) on exactly '
                f"one side, got input shape {tuple(in_shape)} and output shape "
                f'{tuple(out_shape)}; use kind = "mlp" for vector data'
            )
        image = out_shape if self.decoder else in_shape
        out_dim = math.prod(out_shape)
        c, h, w = image
        hs, ws = _conv_sizes(h, len(spec.channels)), _conv_sizes(w, len(spec.channels))
        self.image, self.inner = image, (spec.channels[-1], hs[-1], ws[-1])
        flat = math.prod(self.inner)
        if not self.decoder:
            convs: list[nn.Module] = []
            for a, b in zip([c, *spec.channels[:-1]], spec.channels, strict=True):
                convs += [nn.Conv2d(a, b, 3, stride=2, padding=1), act()]
            self.net = nn.Sequential(*convs, nn.Flatten(), nn.Linear(flat, out_dim))
        else:
            self.fc = nn.Sequential(nn.Linear(math.prod(in_shape), flat), act())
            chans = [*reversed(spec.channels), c]
            layers: list[nn.Module] = []
            for i in range(len(spec.channels)):
                j = len(spec.channels) - i  # from the innermost size outwards
                pad_h = hs[j - 1] - (2 * hs[j] - 1)
                pad_w = ws[j - 1] - (2 * ws[j] - 1)
                layers.append(
                    nn.ConvTranspose2d(
                        chans[i],
                        chans[i + 1],
                        3,
                        stride=2,
                        padding=1,
                        output_padding=(pad_h, pad_w),
                    )
                )
                if i < len(spec.channels) - 1:
                    layers.append(act())
            self.net = nn.Sequential(*layers)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if not self.decoder:
            y = self.net(x.reshape(-1, *self.image))
            return y.reshape(*lead, -1)
        y = self.net(self.fc(x).reshape(-1, *self.inner))
        return y.reshape(*lead, -1)


def build_network(
    spec: Spec, in_shape: tuple[int, ...], out_shape: tuple[int, ...], name: str = "network"
) -> nn.Module:
    """The network `spec` describes, from points of `in_shape` to outputs of `out_shape`.

    `name` (e.g. `"model.encoder"`) prefixes a `ConfigError` the network raises for these shapes.
    """
    try:
        return NETWORKS.build(spec, tuple(in_shape), tuple(out_shape))
    except ConfigError as e:
        raise ConfigError(f"{name}: {e}") from None


def forward_concat(net: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""`net([a, b])`, the two inputs concatenated on the last dim after broadcasting their
    batch dims, without forming the concatenation.

    A network whose first layer is affine computes $W[a; b] + c = (W_a a + c) + W_b b$: each
    part on its own batch shape, added with broadcasting. Where one input carries extra batch
    dims the other lacks (an enumerated label next to an image, $K$ importance samples of $z$
    next to a condition), its partner's part of the first layer is computed once instead of once
    per copy: in M2's guide $q(z \mid x, y)$ with $y$ enumerated over 10 classes, the
    $784 	imes 500$ product on $x$ runs once, not 10 times. Same value as
    `net(concat(a, b))` up to float rounding, same parameters; other networks fall back to that.
    """
    layers = list(net) if isinstance(net, nn.Sequential) else [net]
    first = layers[0] if layers else None
    if not isinstance(first, nn.Linear):
        shape = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
        return net(torch.cat([a.expand(*shape, a.shape[-1]), b.expand(*shape, b.shape[-1])], -1))
    da = a.shape[-1]
    h = nn.functional.linear(a, first.weight[:, :da], first.bias)
    h = h + nn.functional.linear(b, first.weight[:, da:])
    for layer in layers[1:]:
        h = layer(h)
    return h


class Frozen(nn.Module):
    """A network whose weights are fixed: held as buffers, so they are saved and moved with the
    model that owns it but no optimizer and no `pyro.module` sees them (for a pre-trained part,
    e.g. the baseline inside a quadrant CVAE). `forward` is the network's, through
    `torch.func.functional_call`."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self._net = [net]  # a list, not a submodule: its weights live in the buffers below
        self._keys: dict[str, str] = {}
        for name, t in [*net.named_parameters(), *net.named_buffers()]:
            key = name.replace(".", "_")
            self.register_buffer(key, t.detach().clone())
            self._keys[name] = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = {name: getattr(self, key) for name, key in self._keys.items()}
        return torch.func.functional_call(self._net[0], weights, (x,))

    def weights(self) -> dict[str, torch.Tensor]:
        """The weights under the network's own names (as its `state_dict`)."""
        return {name: getattr(self, key) for name, key in self._keys.items()}

    @torch.no_grad()
    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a `state_dict` of the network (same names and shapes) into the buffers."""
        for name, key in self._keys.items():
            getattr(self, key).copy_(state[name])
