"""From a validated config to objects: the model, the device, and the data checked against both."""

from __future__ import annotations

import torch

from pyrovae.autoencoder import AutoEncoder
from pyrovae.config import Config
from pyrovae.data import Dataset
from pyrovae.errors import ConfigError, DataError
from pyrovae.model import VAE


def build_model(config: Config, data_shape: tuple[int, ...]) -> VAE | AutoEncoder:
    """The network `config.model` describes, for data points of shape `data_shape`.

    A `ConfigError` names the block that cannot be built for this data (e.g.
    `model.encoder: kind = "conv" needs image data ...`).
    """
    cls = VAE if config.model.kind == "vae" else AutoEncoder
    return cls(config.model, tuple(data_shape))


def resolve_device(name: str) -> torch.device:
    """`train.device`: `"auto"` is CUDA when available, else the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            'train.device: "cuda" requested but no CUDA device is available; use "auto" or "cpu"'
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_data_for_model(model: VAE | AutoEncoder, data: Dataset, source: str) -> None:
    """Check the data's point shape against the model's, and every split against the
    likelihood's support, once, before any training or evaluation (`DataError` naming `source`)."""
    if tuple(model.data_shape) != tuple(data.shape):
        raise DataError(
            f"{source}: expected data points of shape {tuple(model.data_shape)} "
            f"({model.data_dim} values), as the model was built for; got shape {tuple(data.shape)} "
            f"({data.dim} values). Did the data file change since the model was trained?"
        )
    splits = {"validation": data.x_val, "test": data.x_test}
    if data.binarize != "dynamic":  # dynamic batches are Bernoulli draws, in {0,1} by construction
        splits = {"training": data.x_train, **splits}
    for split, x in splits.items():
        model.likelihood.check_data(x, f"{source} ({split} split)")
