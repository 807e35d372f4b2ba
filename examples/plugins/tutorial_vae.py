"""The VAE of Pyro's tutorial ("Variational Autoencoders", pyro.ai/examples/vae.html), as a
whole-model plugin: its `Encoder`, `Decoder`, `model` and `guide` are the tutorial's, unchanged
apart from the constructor, which takes the validated options (`Spec`) instead of keyword
arguments, and the input size, an option here (the tutorial hard-codes MNIST's 784).

Train it with pyrovae (checkpoints, resume, metrics, `evaluate`, `diagnose`, `sample`):

    pyrovae fit examples/configs/plugin_tutorial_vae.toml --plugin examples/plugins/tutorial_vae.py --out runs/tvae

or name it by import path, `[model] kind = "tutorial_vae:VAE"`, with this folder on PYTHONPATH.
"""

from typing import Literal

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
from pydantic import Field

from pyrovae.model import MODELS
from pyrovae.registry import Spec


class Encoder(nn.Module):
    def __init__(self, z_dim, hidden_dim, input_dim=784):
        super().__init__()
        self.input_dim = input_dim
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, z_dim)
        self.fc22 = nn.Linear(hidden_dim, z_dim)
        self.softplus = nn.Softplus()

    def forward(self, x):
        x = x.reshape(-1, self.input_dim)
        hidden = self.softplus(self.fc1(x))
        z_loc = self.fc21(hidden)
        z_scale = torch.exp(self.fc22(hidden))
        return z_loc, z_scale


class Decoder(nn.Module):
    def __init__(self, z_dim, hidden_dim, input_dim=784):
        super().__init__()
        self.fc1 = nn.Linear(z_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, input_dim)
        self.softplus = nn.Softplus()
        self.sigmoid = nn.Sigmoid()

    def forward(self, z):
        hidden = self.softplus(self.fc1(z))
        loc_img = self.sigmoid(self.fc21(hidden))
        return loc_img


@MODELS.register
class VAE(nn.Module):
    class Spec(Spec):
        kind: Literal["tutorial_vae"] = "tutorial_vae"
        z_dim: int = Field(50, ge=1)
        hidden_dim: int = Field(400, ge=1)
        input_dim: int = Field(784, ge=1)

    def __init__(self, spec):
        super().__init__()
        self.encoder = Encoder(spec.z_dim, spec.hidden_dim, spec.input_dim)
        self.decoder = Decoder(spec.z_dim, spec.hidden_dim, spec.input_dim)
        self.z_dim = spec.z_dim
        self.input_dim = spec.input_dim

    # define the model p(x|z)p(z)
    def model(self, x):
        # register PyTorch module `decoder` with Pyro
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            # setup hyperparameters for prior p(z)
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.z_dim)))
            # sample from prior (value will be sampled by guide when computing the ELBO)
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            # decode the latent code z
            loc_img = self.decoder(z)
            # score against actual images
            pyro.sample(
                "obs",
                dist.Bernoulli(loc_img, validate_args=False).to_event(1),
                obs=x.reshape(-1, self.input_dim),
            )

    # define the guide (i.e. variational distribution) q(z|x)
    def guide(self, x):
        # register PyTorch module `encoder` with Pyro
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            # use the encoder to get the parameters used to define q(z|x)
            z_loc, z_scale = self.encoder(x)
            # sample the latent code z
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))

    # define a helper function for reconstructing images
    def reconstruct_img(self, x):
        # encode image x
        z_loc, z_scale = self.encoder(x)
        # sample in latent space
        z = dist.Normal(z_loc, z_scale).sample()
        # decode the image (note we don't sample in latent space)
        loc_img = self.decoder(z)
        return loc_img

    def sample(self, n):
        """E[x | z], z ~ p(z): what `pyrovae sample` draws (added for pyrovae)."""
        z = torch.randn(n, self.z_dim, device=self.decoder.fc1.weight.device)
        return self.decoder(z)
