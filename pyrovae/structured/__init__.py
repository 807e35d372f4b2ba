r"""Structured VAEs: Pyro programs with more structure than $z \to x$.

Each model is its own short Pyro program (model + guide) in one file of this package, reusing the
building-block registries, so priors, likelihoods, networks and guides stay swappable in each:

| `[model] kind` | file | generative model | guide |
|---|---|---|---|
| `cvae` | `cvae.py` | $p(x \mid z, c)\,p(z \mid c)$ | $q(z \mid x, c)$ |
| `m2` | `m2.py` | $p(x \mid y, z)\,p(y)\,p(z)$, $y$ enumerated when unlabelled | $q(y \mid x)\,q(z \mid x, y)$ |
| `gmvae` | `gmvae.py` | $p(c)\,p(z \mid c)\,p(x \mid z)$, $c$ enumerated | $q(c \mid x)\,q(z \mid x, c)$ (or $q(z \mid x)\,q(c \mid z)$) |
| `hvae` | `hvae.py` | $p(z_L) \cdots p(z_1 \mid z_2)\,p(x \mid z_1)$ | bottom-up $q(z_1 \mid x) \cdots q(z_L \mid z_{L-1})$ |

The contract every class registered here follows (the trainer, evaluation and CLI rely on it):

- built as `Class(model_config, data_shape)` from the validated `[model]` section;
- `model(x, y=None, n_data=None, beta=1.0)` and `guide(...)` with the same arguments: Pyro
  callables whose per-datapoint sample sites sit in `pyro.plate("data")` over the batch `x` of
  shape `(B, D)` (`n_data` the dataset size for the N/B scaling, `beta` the weight of the latent
  sites); `y` is the batch's labels (`int64`, `-1` where unlabelled) for models with
  `uses_labels = True`, and `None` otherwise;
- `sample(n, **condition)` draws from the generative model, `E[x | ...]` of shape `(n, D)`;
- optionally `metrics(x, y) -> dict[str, float]`: the model's own evaluation figures on a split
  (test accuracy, cluster accuracy, conditional NLL), merged into `pyrovae evaluate --json`
  (`y` is the split's labels, or `None` for unlabelled data);
- optionally `before_training(data)`: called once by `pyrovae.fit` for a new run (not on
  `--resume`, not by `load_run`) with the `pyrovae.data.Dataset` about to be trained on, e.g.
  to copy frozen weights the config points to, or to fit a prior to a pretrained model's codes.

Labels (the seams in `pyrovae.train`, `pyrovae.objectives.make_loss`, `pyrovae.build`):

- `uses_labels = True`: the trainer passes each minibatch's labels, `model(x, y=y_batch, ...)`,
  through the one ELBO (`differentiable_loss(model, guide, x, n_data=N, beta=beta, y=y)`);
  `classes` (int) is the number of classes, and the data's labels are checked against it
  before training (`pyrovae.build.check_labels`); `partial_labels = True` lets the training
  labels hold -1 (unlabelled), which `[data] labels = N` produces for all but a
  class-balanced, seeded subset of N points;
- `conditions_on_labels = True`: the test ELBO and log-likelihood are conditional on the
  split's labels, $\log p(x \mid y)$ (they are passed as `y=`); otherwise evaluation calls
  `model(x)` with `y=None`, and the figures are of $\log p(x)$;
- `log_likelihood_of` (str, optional): what the log-likelihood is of, for its note
  (default `"log p(x)"`).

Discrete latent variables: mark their sample sites `infer={"enumerate": "parallel"}` (guide
or model) and train with `[train] objective = "trace_enum"` (`pyro.infer.TraceEnum_ELBO`
sums them out exactly; every program here has one plate, `max_plate_nesting = 1`, so put
no `dim` on enumerated sites). Evaluation needs nothing more: the test ELBO is the
single-sample estimate with those sites drawn from the guide (unbiased); the IWAE
log-likelihood (`pyrovae.evaluate.log_likelihood`) sums them out exactly inside each
importance weight, $w_k = \sum_c p(x, c, z_{kc}) / q(z_{kc} \mid x, c)$, by conditioning
guide and model on every value of their `enumerate_support` (`log_weights_summed`).

`pyrovae sample --label 3` / `--cluster 2` call `sample(n, label=3)` / `sample(n, cluster=2)`:
name the condition as a keyword argument of `sample` (a model without it is refused with a
one-line error; a bad value should raise `ValueError` with one line). `pyrovae diagnose`
runs the generic diagnostics on the program (`pyrovae.structured.diagnose`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

#: `[model] kind` -> class, for the built-in structured models
STRUCTURED: dict[str, type[nn.Module]] = {}


def register(kind: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make `cls` the structured model built for `[model] kind = kind`."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        STRUCTURED[kind] = cls
        cls.kind = kind
        return cls

    return deco

# The built-in structured models register themselves when their module is imported; each module
# adds its import line here, e.g. `from pyrovae.structured import m2` (noqa E402, F401).
from pyrovae.structured import cvae, gmvae, hvae, m2  # noqa: E402, F401
