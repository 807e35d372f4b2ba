"""M2 on MNIST with 100 labels: test accuracy over label draws, and enumerating vs sampling y.

Protocol (Pyro's SS-VAE example, `examples/configs/mnist_m2.toml`): 50,000 training images of
which `--labels` (default 100, 10 per class) keep their label, drawn class-balanced with seed
`d` for draw `d` (`[data] labels`, `[train] seed`); dynamically binarized (`--grey`: grey levels
under the Bernoulli cross-entropy, as the example trains); one hidden layer of
500 softplus units per network, z of 50 dimensions, Adam lr 4.2e-4, batch 200 of which 10
labelled, alpha = 5000 (0.1 N per labelled point; the example's 46 with `--alpha 46`).
The figure is the accuracy of argmax q(y|x) on the 10,000 official test images, as mean ±
sample s.d. over `--draws` label draws (published, Pyro tutorial: 0.9319 with 100 labels,
sampling y instead of enumerating: about 0.20). The ablation (`--ablation`) trains draw 0
with `train.objective = "trace_elbo"` (y sampled, score-function gradient).

Minibatches: `--labelled-per-batch k` (`[train] labelled_per_batch`) puts k labelled points in
every minibatch beside B - k unlabelled ones, each group scaled to its size so the loss is
still an unbiased estimate of the full-data objective (`pyrovae.train.LabelledBatches`); 0 is
plain random minibatches, where a batch of 200 holds 0.4 labelled points on average.
`--alpha` overrides `model.alpha` (the weight of alpha * log q(y|x) per labelled point).
Both default to the config's values.

Time-bounded: `--minutes` is shared equally by the runs (draws, plus the ablation); each run
trains until its share is spent (or `--epochs`), and after every epoch the test accuracy (and
the accuracy on the 10,000 validation images, which the Pyro example uses to pick its epoch)
is written to `--out`. A finished run is not repeated when the script is rerun with the same
`--out`; with `--checkpoint DIR` an unfinished run also resumes from its last epoch (the
trainer's state, its epoch order included, is saved there after every epoch), with the time it
already spent counted against its share.

    python benchmarks/structured_m2.py --root <mnist-root> --minutes 60 --draws 3 --ablation
    python benchmarks/structured_m2.py --root <mnist-root> --minutes 45 --draws 1 \\
        --labelled-per-batch 10 --checkpoint <folder>
    python benchmarks/structured_m2.py --root <mnist-root> --device cuda --minutes 2 --draws 3 --ablation

M1+M2 (M2 on the codes of a trained VAE, `[data] codes_from`): train M1 first, then pass its run
folder; the time M1 took counts against the hour:

    pyrovae fit examples/configs/mnist_m1.toml --out runs/mnist_m1
    python benchmarks/structured_m2.py --root <mnist-root> --config examples/configs/mnist_m1m2.toml \
        --codes-from runs/mnist_m1 --minutes 39.5 --draws 3 --epochs 400

(--minutes is shared by the three draws there). Each draw in its own 39.5 minutes, two at a
time on two cores, all three into one result file:

    python benchmarks/structured_m2.py ... --minutes 39.5 --first-draw 0 --draws 1 --checkpoint <folder> --out <out.json>
    python benchmarks/structured_m2.py ... --minutes 39.5 --first-draw 1 --draws 1 --checkpoint <folder> --out <out.json> &
    python benchmarks/structured_m2.py ... --minutes 39.5 --first-draw 2 --draws 1 --checkpoint <folder> --out <out.json>
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyro  # noqa: E402

from pyrovae import load_config, load_data  # noqa: E402
from pyrovae.build import build_model, resolve_device  # noqa: E402
from pyrovae.train import Callback, Trainer  # noqa: E402


class Deadline(Callback):
    """Stops the trainer once `seconds` have passed (counting `spent` seconds of earlier
    runs of the script); records validation and test accuracy every epoch and saves the trainer's state
    to `checkpoint` (if given)."""

    def __init__(self, seconds: float, spent: float, splits: dict, rows: list, save, checkpoint=None) -> None:
        self.end, self.splits, self.rows, self.save = time.time() + seconds - spent, splits, rows, save
        self.start, self.checkpoint = time.time() - spent, checkpoint

    def on_step_end(self, trainer, loss) -> None:
        if time.time() > self.end:
            trainer.request_stop()

    def on_epoch_end(self, trainer) -> None:
        trainer.model.eval()
        acc = {f"{k}_accuracy": float((trainer.model.classify(x) == y).double().mean())
               for k, (x, y) in self.splits.items()}
        trainer.model.train()
        h = trainer.history[-1]
        self.rows.append(
            {"epoch": h["epoch"], "seconds": round(time.time() - self.start, 1),
             "train_elbo": h["train_elbo"], "val_elbo": h["val_elbo"], **acc}
        )
        if self.checkpoint is not None:
            tmp = self.checkpoint.with_suffix(".tmp")
            torch.save(trainer.state_dict(), tmp)
            tmp.replace(self.checkpoint)
        self.save()


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def public_args(argv: list[str]) -> list[str]:
    """The command line with the machine's paths as placeholders (`<mnist-root>`, `<folder>`, and
    `<out.json>` for an absolute `--out`)."""
    out, hide = [], {"--root": "<mnist-root>", "--checkpoint": "<folder>", "--out": "<out.json>",
                     "--codes-from": "<m1-run>"}
    for i, arg in enumerate(argv):
        secret = i and argv[i - 1] in hide and not (argv[i - 1] == "--out" and not Path(arg).is_absolute())
        out.append(hide[argv[i - 1]] if secret else arg)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="", help="folder with the four MNIST IDX files")
    p.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget for all runs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--draws", type=int, default=3, help="label draws (seeds first..first+draws-1)")
    p.add_argument("--first-draw", type=int, default=0,
                   help="seed of the first draw: two processes with --first-draw 0 --draws 1 and "
                   "--first-draw 1 --draws 2 share the work of --draws 3 (same --out)")
    p.add_argument("--labels", type=int, default=100)
    p.add_argument("--epochs", type=int, default=50, help="at most this many epochs per run")
    p.add_argument("--ablation", action="store_true", help="also train draw 0 with y sampled")
    p.add_argument("--ablation-minutes", type=float, default=None,
                   help="budget of the ablation run (default: an equal share of --minutes)")
    p.add_argument("--labelled-per-batch", type=int, default=None,
                   help="labelled points in every minibatch (train.labelled_per_batch; default: the "
                        "config's, 10; 0: random minibatches)")
    p.add_argument("--labelled-batches", action="store_true",
                   help="train.labelled_batches = true (the labelled points in minibatches of their own, "
                        "as Pyro's SS-VAE example; sets labelled_per_batch = 0)")
    p.add_argument("--alpha", type=float, default=None, help="model.alpha (default: the config's, 5000)")
    p.add_argument("--checkpoint", default=None, help="folder for per-epoch trainer states (resume)")
    p.add_argument("--grey", action="store_true",
                   help="the example's data: grey levels (not binarized) under the Bernoulli cross-entropy")
    p.add_argument("--config", default=str(ROOT / "examples" / "configs" / "mnist_m2.toml"),
                   help="the M2 config (default examples/configs/mnist_m2.toml; M1+M2: mnist_m1m2.toml)")
    p.add_argument("--codes-from", default=None,
                   help="data.codes_from: the run folder of the trained VAE M1 whose codes M2 models")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None, help="JSON results (default benchmarks/results/<device>/structured_m2.json)")
    a = p.parse_args()
    out = Path(a.out or ROOT / "benchmarks" / "results" / ("h200" if a.device == "cuda" else "cpu") / "structured_m2.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    res = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    res.update(
        figure="M2 test accuracy (argmax q(y|x)) on the 10,000 MNIST test images",
        labels=a.labels, device=a.device, commit=git_commit(), minutes=a.minutes,
        date=datetime.now(UTC).strftime("%Y-%m-%d"), machine=platform.machine(),
        torch_threads=torch.get_num_threads(),
        command="python benchmarks/structured_m2.py " + " ".join(public_args(sys.argv[1:])),

        config=str(Path(a.config).resolve().relative_to(ROOT)) if Path(a.config).resolve().is_relative_to(ROOT)
        else Path(a.config).name,
        data="codes of the VAE M1 (data.codes_from)" if a.codes_from or "m1m2" in a.config
        else "grey levels, Bernoulli cross-entropy" if a.grey else "dynamically binarized, Bernoulli",
        published={"100": 0.9319, "600": 0.9437, "1000": 0.9487, "3000": 0.9582, "sampled_y": 0.20},
    )

    mine: set[str] = set()  # the runs this process trains; the others' are read back from `out`

    def save() -> None:
        if out.exists():  # another process (--first-draw) may have written its runs since
            disk = json.loads(out.read_text()).get("runs", {})
            res["runs"] = {**disk, **{k: v for k, v in res["runs"].items() if k in mine or k not in disk}}
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(res, indent=2))
        tmp.replace(out)

    plan = [(f"enumerate_draw{d}", d, "trace_enum") for d in range(a.first_draw, a.first_draw + a.draws)]
    if a.ablation:
        plan.append(("sample_y_draw0", 0, "trace_elbo"))
    todo = [r for r in plan if not res["runs"].get(r[0], {}).get("finished")]
    abl = [r for r in todo if r[2] == "trace_elbo"]
    abl_s = min(a.ablation_minutes * 60, a.minutes * 60 / 2) if abl and a.ablation_minutes else None
    n_share = len(todo) - (1 if abl_s is not None else 0)
    share = (a.minutes * 60 - (abl_s or 0)) / max(n_share, 1)
    for name, seed, objective in todo:
        budget = abl_s if objective == "trace_elbo" and abl_s is not None else share
        sets = [f"data.labels={a.labels}", f"train.seed={seed}", f"train.objective={json.dumps(objective)}",
                f"train.epochs={a.epochs}", f"train.device={json.dumps(a.device)}", *a.set]
        if a.grey:
            sets += ['data.binarize="none"', 'model.likelihood={kind="bernoulli_cross_entropy"}']
        if a.labelled_per_batch is not None:
            sets.append(f"train.labelled_per_batch={a.labelled_per_batch}")
        if a.labelled_batches:
            sets += ["train.labelled_per_batch=0", "train.labelled_batches=true"]
        if a.alpha is not None:
            sets.append(f"model.alpha={a.alpha}")
        if a.root:
            sets.append(f"data.root={json.dumps(a.root)}")
        if a.codes_from:
            sets.append(f"data.codes_from={json.dumps(a.codes_from)}")
        cfg = load_config(a.config, sets)
        pyro.set_rng_seed(seed)
        data = load_data(cfg.data, seed=seed)
        model = build_model(cfg, data.shape)
        device = resolve_device(cfg.train.device)
        ckpt = Path(a.checkpoint) / f"{out.stem}_{name}.pt" if a.checkpoint else None
        old = res["runs"].get(name, {})
        resume = ckpt is not None and ckpt.exists() and old.get("epochs")
        rows: list = list(old["epochs"]) if resume else []
        spent = rows[-1]["seconds"] if rows else 0.0
        mine.add(name)
        res["runs"][name] = {"objective": objective, "seed": seed, "epochs": rows, "finished": False,
                             "command": res["command"], "commit": res["commit"],
                             "labelled_per_batch": cfg.train.labelled_per_batch,
                             "labelled_batches": cfg.train.labelled_batches, "alpha": model.alpha}
        x_test, y_test = data.x_test.to(device), data.y_test.to(device)
        splits = {"test": (x_test, y_test)}
        if data.y_val is not None and len(data.y_val):
            splits["val"] = (data.x_val.to(device), data.y_val.to(device))
        t0 = time.time() - spent
        if ckpt is not None:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
        trainer = Trainer(model, cfg.train, data.x_train, data.x_val, dynamic_binarize=cfg.data.binarize == "dynamic", device=device,
                          callbacks=[Deadline(budget, spent, splits, rows, save, ckpt)], progress=False,
                          y_train=data.y_train, x_train_scale=data.x_train_scale)
        if resume:
            trainer.load_state_dict(torch.load(ckpt, weights_only=False))
            print(f"{name}: resumed after epoch {trainer.epoch} ({spent:.0f} s spent)", flush=True)
        trainer.train()
        model.eval()
        acc = float((model.classify(x_test) == y_test).double().mean())
        best = max(rows, key=lambda r: r.get("val_accuracy", 0.0)) if rows else None
        res["runs"][name].update(finished=True, test_accuracy=acc, seconds=round(time.time() - t0, 1),
                                 epochs_completed=len(trainer.history))
        if best is not None and "val_accuracy" in best:
            res["runs"][name].update(best_val_epoch=best["epoch"], best_val_accuracy=best["val_accuracy"],
                                     test_accuracy_at_best_val=best["test_accuracy"])
        print(f"{name}: test accuracy {acc:.4f} after {len(trainer.history)} epochs, "
              f"{time.time() - t0:.0f} s", flush=True)
        save()
    save()  # read back the runs other processes finished meanwhile
    enum = [r["test_accuracy"] for k, r in res["runs"].items() if k.startswith("enumerate") and r.get("finished")]
    if enum:
        res["enumerate_mean"] = statistics.mean(enum)
        res["enumerate_sd"] = statistics.stdev(enum) if len(enum) > 1 else None
    if res["runs"].get("sample_y_draw0", {}).get("finished"):
        res["sample_y"] = res["runs"]["sample_y_draw0"]["test_accuracy"]
    save()
    print(json.dumps({k: res.get(k) for k in ("enumerate_mean", "enumerate_sd", "sample_y", "labels", "device")}))


if __name__ == "__main__":
    main()
