"""From a validated config to objects: the model, the device, and the data checked against both."""

from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from pyrovae.autoencoder import AutoEncoder
from pyrovae.config import Config
from pyrovae.data import Dataset, row_chunks
from pyrovae.errors import ConfigError, DataError
from pyrovae.model import MODELS, VAE
from pyrovae.structured import STRUCTURED

DATA_PLATE = "data"


def build_model(config: Config, data_shape: tuple[int, ...]) -> torch.nn.Module:
    """The network `config.model` describes, for data points of shape `data_shape`.

    A `ConfigError` names the block that cannot be built for this data (e.g.
    `model.encoder: kind = "conv" needs image data ...`). A plugin model is built as
    `Class(options)` from its validated `[model.options]`; pyrovae sets its `data_shape` and
    `data_dim` attributes (the flat batches it is given have shape `(B, data_dim)`).
    """
    kind = config.model.kind
    if kind in MODELS:
        try:
            model = MODELS[kind](config.model.options)
        except Exception as e:  # noqa: BLE001 - the user's constructor failed: one line
            raise ConfigError(
                f"model.kind = {kind!r}: building the model from model.options raised "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from None
        model.data_shape, model.data_dim = tuple(data_shape), math.prod(data_shape)
        return model
    cls = STRUCTURED.get(kind) or (VAE if kind == "vae" else AutoEncoder)
    return cls(config.model, tuple(data_shape))


def is_plugin_model(model: torch.nn.Module) -> bool:
    return not isinstance(model, (VAE, AutoEncoder, *STRUCTURED.values()))


def check_program(model: torch.nn.Module, x: torch.Tensor, key: str = "model.kind") -> None:
    """A plugin model's Pyro program, run once on a batch `x`: every sample site of `model`
    and `guide` must be inside `pyro.plate("data")` over the batch, so that the trainer's N/B
    scaling is unbiased (global latent variables are not supported); `ConfigError` naming
    the site otherwise, or naming the method that failed to run."""
    name = type(model).__name__
    for method in ("model", "guide"):
        if not callable(getattr(model, method, None)):
            raise ConfigError(f"{key}: {name} has no {method}(x) method; expected a Pyro {method}")
    with torch.no_grad(), poutine.block(), pyro.validation_enabled(False):
        try:
            guide = poutine.trace(model.guide).get_trace(x)
            prog = poutine.trace(poutine.replay(model.model, trace=guide)).get_trace(x)
        except Exception as e:  # noqa: BLE001 - the user's program failed: one line
            raise ConfigError(
                f"{key}: running {name}.model/guide on a batch of shape {tuple(x.shape)} raised "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from None
    for where, trace in (("guide", guide), ("model", prog)):
        for site in trace.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            frames = [f for f in site["cond_indep_stack"] if f.name == DATA_PLATE]
            if not frames or frames[0].size != x.shape[0]:
                raise ConfigError(
                    f"{key}: sample site {site['name']!r} of {name}.{where} is not inside "
                    f'pyro.plate("{DATA_PLATE}", x.shape[0]): the trainer scales each minibatch '
                    "by N/B, which is unbiased only for per-datapoint sites; put every sample "
                    "site in that plate (global latent variables are not supported)"
                )


def resolve_device(name: str) -> torch.device:
    """`train.device`: `"auto"` is CUDA when available, else the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            'train.device: "cuda" requested but no CUDA device is available; use "auto" or "cpu"'
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_data_for_model(model: torch.nn.Module, data: Dataset, source: str) -> None:
    """Check the data's point shape against the model's, and every split against the
    likelihood's support, once, before any training or evaluation (`DataError` naming `source`).
    A plugin model has no `likelihood` object: its program runs on every split with Pyro's
    validation on, and a rejected value is a `DataError` naming the split and the site."""
    if tuple(model.data_shape) != tuple(data.shape):
        raise DataError(
            f"{source}: expected data points of shape {tuple(model.data_shape)} "
            f"({model.data_dim} values), as the model was built for; got shape {tuple(data.shape)} "
            f"({data.dim} values). Did the data file change since the model was trained?"
        )
    splits = {"validation": data.x_val, "test": data.x_test}
    if data.binarize != "dynamic":  # dynamic batches are Bernoulli draws, in {0,1} by construction
        splits = {"training": data.x_train, **splits}
    if getattr(model, "uses_labels", False):
        check_labels(model, data, source)
    for split, x in splits.items():
        if hasattr(model, "likelihood") and hasattr(model.likelihood, "check_data"):
            for chunk in row_chunks(x):  # a split on disk: one streaming pass
                model.likelihood.check_data(chunk, f"{source} ({split} split)")
        else:
            _validate_program(model, x, f"{source} ({split} split)")


def check_labels(model: torch.nn.Module, data: Dataset, source: str) -> None:
    """A structured model with `uses_labels`: the data must have labels, each in
    `0 .. model.classes - 1` (and -1, unlabelled, in the training split only where the model
    takes unlabelled points, `model.partial_labels`); `DataError` naming the split otherwise."""
    kind = getattr(model, "kind", type(model).__name__)
    if data.y_train is None:
        raise DataError(
            f"{source}: model.kind = {kind!r} trains on labels, but the data have none (expected "
            "mnist, digits, an .npz with 'y' or a folder of class sub-folders)"
        )
    c = model.classes
    for split, y in (("training", data.y_train), ("validation", data.y_val), ("test", data.y_test)):
        if y is None or y.numel() == 0:
            continue
        low = -1 if split == "training" and getattr(model, "partial_labels", False) else 0
        bad = (y < low) | (y >= c)
        if bad.any():
            i = int(bad.nonzero()[0])
            what = " (or -1, unlabelled)" if low == -1 else ""
            hint = (
                "; this model needs every training label: leave data.labels unset"
                if split == "training" and int(y[i]) == -1
                else f"; set model.classes to the number of classes ({int(y.max()) + 1}?)"
            )
            raise DataError(
                f"{source} ({split} split): expected labels in 0..{c - 1}{what} for model.classes "
                f"= {c}; got {int(y[i])} at index {i}{hint}"
            )


def _validate_program(model: torch.nn.Module, x: torch.Tensor, source: str) -> None:
    device = next(model.parameters(), torch.empty(0)).device
    with torch.no_grad(), poutine.block(), pyro.validation_enabled(True):
        for xb in x.split(4096):
            try:
                guide = poutine.trace(model.guide).get_trace(xb.to(device))
                trace = poutine.trace(poutine.replay(model.model, trace=guide)).get_trace(
                    xb.to(device)
                )
                trace.compute_log_prob()
            except ValueError as e:
                detail = " ".join(str(e).split())[:300]
                raise DataError(f"{source}: the model rejects the data: {detail}") from None
