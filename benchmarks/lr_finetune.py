"""Does a lower learning rate pay at the end of training? Continue a trained MNIST run for a few
epochs at a given constant rate and compare the test NLL before and after (paired: same test
images, same seed for the importance samples).

    python benchmarks/lr_finetune.py runs/mnist_nll/vae 1e-4 6   # the run folder of a trained model
    python benchmarks/lr_finetune.py runs/mnist_nll/vae 1e-4 6 --root /path/with/the/four/idx/files

``--root`` (the folder with the four MNIST IDX files) replaces the run's own ``data.root``; left
empty (the default) the run's ``data.root`` applies (``""`` there: torchvision's download cache,
``~/.cache/pyrovae/mnist``).

Prints the IWAE-bound test NLL (K = 100, first 1,000 test images, nats) before and after, and the
validation ELBO of each extra epoch. The run folder itself is not modified (a copy is trained).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import pyro
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from mnist_nll import nll  # noqa: E402

import pyrovae  # noqa: E402
from pyrovae.runs import CHECKPOINT, load_checkpoint, save_checkpoint  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("lr", type=float)
    p.add_argument("epochs", type=int)
    p.add_argument(
        "--root", default="", help="folder with the four MNIST IDX files ('' = the run's data.root)"
    )
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    run = pyrovae.load_run(a.run_dir)
    root = a.root or run.config.data.root
    x = pyrovae.load_data(run.config.data.model_copy(update={"root": root}), seed=run.config.train.seed).x_test[:1000]
    pyro.set_rng_seed(1)
    before = nll(run, x, 100)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        shutil.copytree(a.run_dir, out)
        done = len(run.history)
        sets = [f"train.epochs={done + a.epochs}", f"train.lr={a.lr}", "train.lr_decay=1.0", "train.lr_min=0.0"]
        cfg = pyrovae.load_config(out / "config.toml", sets + [f"data.root={json.dumps(root)}"])
        # --resume only lets train.epochs change; continue with the stored state under the new rate
        cfg.save(out / "config.toml")
        state = load_checkpoint(out / CHECKPOINT)
        state["config"] = cfg.to_dict()
        state["lr"] = a.lr
        save_checkpoint(out / CHECKPOINT, state)
        after_run = pyrovae.fit(cfg, out, resume=True, progress=False, figures=False)
        pyro.set_rng_seed(1)
        after = nll(after_run, x, 100)
        vals = [round(h["val_elbo"], 2) for h in after_run.history[done:]]
    print(f"lr {a.lr:g}, {a.epochs} more epochs: test NLL (K=100, 1,000 images) {before[0]:.2f} -> {after[0]:.2f}; val ELBO {vals}")


if __name__ == "__main__":
    main()
