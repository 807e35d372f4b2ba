"""pyrovae: variational autoencoders as real Pyro programs.

* :class:`VAE` — ``model(x)`` = p(z) p(x|z) in ``pyro.plate("data")``, ``guide(x)`` = q(z|x);
* :class:`AutoEncoder` — the deterministic baseline with the same networks;
* :func:`load_config`, :func:`fit`, :func:`load_run` — declarative config, training, run folders.

Where things live: priors in :mod:`pyrovae.priors`, likelihoods in :mod:`pyrovae.likelihoods`,
networks in :mod:`pyrovae.networks`, q(z|x) in :mod:`pyrovae.guides`, the Pyro program in
:mod:`pyrovae.model`, objectives in :mod:`pyrovae.objectives`, training in :mod:`pyrovae.train`,
estimators in :mod:`pyrovae.evaluate`, data in :mod:`pyrovae.data`, config in
:mod:`pyrovae.config`, the CLI in :mod:`pyrovae.cli`, figures in :mod:`pyrovae.plots`, lessons in
:mod:`pyrovae.teaching`.
"""

from pyrovae.autoencoder import AutoEncoder
from pyrovae.config import Config, load_config
from pyrovae.data import DataConfig, Dataset, load_data
from pyrovae.errors import CheckpointError, ConfigError, DataError, PyroVAEError, TrainingError
from pyrovae.model import VAE
from pyrovae.train import Run, build_model, fit, load_run

__version__ = "0.1.0"

__all__ = [
    "VAE",
    "AutoEncoder",
    "Config",
    "DataConfig",
    "Dataset",
    "Run",
    "build_model",
    "fit",
    "load_config",
    "load_data",
    "load_run",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "TrainingError",
    "PyroVAEError",
]
