"""pyrovae: variational autoencoders as real Pyro programs.

* `VAE`: `model(x)` = p(z) p(x|z) in `pyro.plate("data")`, `guide(x)` = q(z|x);
* `AutoEncoder`: the deterministic baseline with the same networks;
* `load_config`, `fit`, `load_run`: declarative config, training, run folders.

Where things live: p(z) in `pyrovae.priors`, p(x|z) in `pyrovae.likelihoods`, encoder and
decoder networks in `pyrovae.networks`, q(z|x) in `pyrovae.guides`, the Pyro program in
`pyrovae.model`, the autoencoder in `pyrovae.autoencoder`, the ELBOs in `pyrovae.objectives`,
the model built from a config in `pyrovae.build`, the training loop in `pyrovae.train`, run
folders in `pyrovae.runs`, estimators in `pyrovae.evaluate`, diagnostics in
`pyrovae.diagnostics`, fit / evaluate / compare in `pyrovae.workflow`, data in `pyrovae.data`,
config in `pyrovae.config`, the CLI in `pyrovae.cli`, figures in `pyrovae.plots` and
`pyrovae.report`, lessons in `pyrovae.teaching`.
"""

from pyrovae.autoencoder import AutoEncoder
from pyrovae.build import build_model
from pyrovae.config import Config, load_config
from pyrovae.data import DataConfig, Dataset, load_data
from pyrovae.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    PyroVAEError,
    RunLockedError,
    RunWriteError,
    TrainingError,
)
from pyrovae.model import VAE
from pyrovae.registry import load_plugin
from pyrovae.runs import Run, load_run
from pyrovae.workflow import compare, evaluate_run, fit

__version__ = "0.1.0"

__all__ = [
    "VAE",
    "AutoEncoder",
    "Config",
    "DataConfig",
    "Dataset",
    "Run",
    "build_model",
    "compare",
    "evaluate_run",
    "fit",
    "load_config",
    "load_data",
    "load_plugin",
    "load_run",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "TrainingError",
    "PyroVAEError",
    "RunLockedError",
    "RunWriteError",
]
