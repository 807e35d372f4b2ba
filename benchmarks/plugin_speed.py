"""A whole-model plugin (the Pyro tutorial's VAE, `examples/plugins/tutorial_vae.py`) trained by
pyrovae against the same model trained by a plain `pyro.infer.SVI` loop: speed and test ELBO.

Both sides: the tutorial VAE (784-400-50, Bernoulli), dynamically binarized MNIST, batch 128,
Adam with lr 1e-3, `Trace_ELBO`, Pyro's validation off after the first step, 2 threads.

1. **speed** — `--steps` steps of each, interleaved in blocks of 5 (rotating order), median over
   `--repeats` of (pyrovae `Trainer.step` time / `svi.step` time) in the same repeat (both
   models register their networks under the tutorial's fixed names, "encoder"/"decoder", so
   during this interleaved timing SVI's optimizer updates the tensors first registered: the
   same work per step, which is what is timed);
2. **quality** — `--epochs` epochs of each from the same initial weights, then the test ELBO
   (nats per test image, 10 samples per image, the 10,000 test images binarized once with seed 0).

```bash
python benchmarks/plugin_speed.py --root /path/to/mnist --json
```
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pyro  # noqa: E402
import torch  # noqa: E402

import pyrovae  # noqa: E402
from pyrovae import evaluate  # noqa: E402
from pyrovae.data import bernoulli  # noqa: E402
from pyrovae.train import Trainer  # noqa: E402


def setup(root: str, epochs: int):
    pyrovae.load_plugin(ROOT / "examples" / "plugins" / "tutorial_vae.py")
    cfg = pyrovae.load_config({
        "data": {"dataset": "mnist", "root": root, "binarize": "dynamic", "val_fraction": 0},
        "model": {"kind": "tutorial_vae", "options": {"z_dim": 50, "hidden_dim": 400, "input_dim": 784}},
        "train": {"epochs": epochs, "batch_size": 128, "lr": 1e-3, "device": "cpu", "seed": 0},
    })
    data = pyrovae.load_data(cfg.data, seed=0)
    return cfg, data


class HandSVI:
    """The tutorial's loop: `svi.step(x)` on shuffled, binarized minibatches."""

    def __init__(self, model, x_train, batch_size=128, seed=0):
        self.model, self.x, self.b = model, x_train, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.svi = pyro.infer.SVI(model.model, model.guide, pyro.optim.Adam({"lr": 1e-3}),
                                  pyro.infer.Trace_ELBO())
        self.perm = None

    def new_epoch(self):
        self.perm = torch.randperm(len(self.x), generator=self.gen)

    def step(self, s):
        x = bernoulli(self.x.index_select(0, self.perm[s * self.b:(s + 1) * self.b]), self.gen)
        return self.svi.step(x) / len(x)


def speed(cfg, data, steps, repeats):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    m1 = pyrovae.build_model(cfg, data.shape)
    m2 = copy.deepcopy(m1)
    tr = Trainer(m1, cfg.train, data.x_train, dynamic_binarize=True)
    hand = HandSVI(m2, data.x_train)
    per_epoch = math.ceil(len(data.x_train) / 128)
    tr.perm = torch.randperm(len(data.x_train), generator=tr.gen)
    hand.new_epoch()
    runners = {"pyrovae": lambda s: tr.step(tr.batch(s)), "svi": hand.step}
    for s in range(5):  # warm-up
        for f in runners.values():
            f(s)
    ratios, times = [], {k: [] for k in runners}
    pos = 5
    for rep in range(repeats):
        tot = dict.fromkeys(runners, 0.0)
        names = list(runners) if rep % 2 == 0 else list(runners)[::-1]
        for start in range(0, steps, 5):
            for name in names:
                t0 = time.perf_counter()
                for k in range(5):
                    runners[name]((pos + start + k) % per_epoch)
                tot[name] += time.perf_counter() - t0
        pos += steps
        ratios.append(tot["pyrovae"] / tot["svi"])
        for k, v in tot.items():
            times[k].append(1e3 * v / steps)
    return {"ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ms_per_step": {k: statistics.median(v) for k, v in times.items()}}


def quality(cfg, data, epochs):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    m1 = pyrovae.build_model(cfg, data.shape)
    m2 = copy.deepcopy(m1)
    t0 = time.perf_counter()
    with pyro.validation_enabled(False):
        Trainer(m1, cfg.train, data.x_train, dynamic_binarize=True, progress=False).train()
    t_pyrovae = time.perf_counter() - t0
    # the tutorial registers its networks as "encoder"/"decoder": with m1's tensors still in the
    # param store under those names, SVI would optimize m1's tensors instead of m2's
    pyro.clear_param_store()
    hand = HandSVI(m2, data.x_train)
    t0 = time.perf_counter()
    with pyro.validation_enabled(False):
        for _ in range(epochs):
            hand.new_epoch()
            for s in range(math.ceil(len(data.x_train) / 128)):
                hand.step(s)
    t_hand = time.perf_counter() - t0
    out = {}
    for name, m in (("pyrovae", m1), ("svi", m2)):
        pyro.set_rng_seed(1)
        with evaluate.evaluation_mode(m):
            out[name] = float(evaluate.elbo(m.model, m.guide, data.x_test, 10, batch_size=1000).mean())
    return {"epochs": epochs, "test_elbo": out, "difference": out["pyrovae"] - out["svi"],
            "train_seconds": {"pyrovae": t_pyrovae, "svi": t_hand}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="", help="folder with the four MNIST IDX files ('' = download cache)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg, data = setup(a.root, max(1, a.epochs))
    with pyro.validation_enabled(False):
        sp = speed(cfg, data, a.steps, a.repeats)
    q = quality(cfg, data, a.epochs) if a.epochs > 0 else None
    res = {"speed": sp, "quality": q, "torch": torch.__version__, "pyro": pyro.__version__,
           "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(res, indent=1) if a.json else res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
