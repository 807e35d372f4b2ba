"""CVAE vs its deterministic baseline on MNIST quadrants: conditional NLL for 1/2/3 given quadrants.

Protocol (`examples/configs/mnist_cvae.toml`; task of Pyro's CVAE example): given 1 quadrant
(bottom-left), 2 (the left half) or 3 (all but the bottom-right) of a test digit, the negative
log-likelihood of the missing pixels, $-\\log p(x_{missing} \\mid x_{given})$, in nats per
image. One CVAE and one baseline network (`model.kind = "cvae_baseline"`, the example's
deterministic network; no latent variable, so its figure is exact) each serve all three
counts. Training images are binarized afresh every batch, the test images once (seeded), with
a Bernoulli likelihood. The CVAE's figure is given twice: the IWAE bound with `--eval-k`
samples (the tighter, reported as `conditional_nll`) and the single-sample negative ELBO
(`conditional_nll_elbo`, the kind of estimate the example tabulates).

Published (Pyro example, grey-level targets under a Bernoulli cross-entropy, each count its
own model, baseline also feeding the CVAE's prior net): CVAE 71.8 / 51.0 / 24.2, baseline
100.4 / 61.9 / 25.4 nats. By default the numbers here are of binarized test images, so they are
close to but not the same quantity; the baseline-vs-CVAE gap is the comparable part. `--grey`
runs the example's protocol instead: images as grey levels, scored by the same Bernoulli
cross-entropy (`model.likelihood.kind = "bernoulli_cross_entropy"`), so the figures sit beside the
published ones (a cross-entropy of grey levels, not a density).

`--baseline-prior` feeds the CVAE's prior net the baseline's prediction in the hidden pixels
(`model.baseline_run`, the example's design; the baseline trained first is copied in, frozen).
`--separate` trains one baseline and one CVAE per count (`model.given = [g]`), as the example
does, each pair with a third of the budget; each count's figure comes from its own models.

Time-bounded and written as it goes: `--minutes` is split between the baseline (first, as in
the example; `--baseline-share` of the time) and the CVAE; after each finished run its figures
go to `--out`, and a finished run is not repeated on a rerun with the same `--out`.

    python benchmarks/structured_cvae.py --root /path/to/mnist --minutes 60
    python benchmarks/structured_cvae.py --root /path/to/mnist --device cuda --minutes 2
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyro  # noqa: E402

from benchmarks.structured_m2 import git_commit  # noqa: E402
from pyrovae import load_config, load_data  # noqa: E402
from pyrovae.build import build_model, resolve_device  # noqa: E402
from pyrovae.train import Callback, Trainer  # noqa: E402

PUBLISHED = {
    "cvae": {"1": 71.8, "2": 51.0, "3": 24.2},
    "baseline": {"1": 100.4, "2": 61.9, "3": 25.4},
}


class Deadline(Callback):
    """Stops at the time budget, or (with `patience`) after that many epochs without a better
    validation ELBO, keeping the best epoch's weights, as the example's early stopping does."""

    def __init__(self, seconds: float, rows: list, save, patience: int | None = None) -> None:
        self.start, self.end, self.rows, self.save = time.time(), time.time() + seconds, rows, save
        self.patience, self.best, self.best_epoch, self.best_state = patience, -float("inf"), 0, None

    def on_step_end(self, trainer, loss) -> None:
        if time.time() > self.end:
            trainer.request_stop()

    def on_epoch_end(self, trainer) -> None:
        h = trainer.history[-1]
        self.rows.append({"epoch": h["epoch"], "seconds": round(time.time() - self.start, 1),
                          "train_elbo": h["train_elbo"], "val_elbo": h["val_elbo"]})
        self.save()
        if self.patience is None:
            return
        if h["val_elbo"] > self.best:
            self.best, self.best_epoch = h["val_elbo"], h["epoch"]
            self.best_state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        elif h["epoch"] - self.best_epoch >= self.patience:
            trainer.request_stop()

    def restore_best(self, model) -> int | None:
        """Load the best validation epoch's weights into `model`; return that epoch."""
        if self.best_state is None:
            return None
        model.load_state_dict(self.best_state)
        return self.best_epoch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="", help="folder with the four MNIST IDX files")
    p.add_argument("--minutes", type=float, default=60.0, help="training budget for both runs")
    p.add_argument("--baseline-share", type=float, default=0.3, help="share of --minutes for the baseline")
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--eval-k", type=int, default=64, help="IWAE samples per test image")
    p.add_argument("--eval-points", type=int, default=10000, help="test images scored")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--cvae-set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for the CVAE only, e.g. model.decoder_reads_condition=false")
    p.add_argument("--baseline-prior", action="store_true",
                   help="the CVAE's prior net reads the baseline's prediction (model.baseline_run)")
    p.add_argument("--separate", action="store_true", help="one baseline and one CVAE per count")
    p.add_argument("--counts", default="1,2,3",
                   help="with --separate: the counts to train (the budget is split among them)")
    p.add_argument("--patience", type=int, default=None,
                   help="early stopping: stop after this many epochs without a better validation "
                        "ELBO and score the best epoch's weights (the example uses 3)")
    p.add_argument("--grey", action="store_true",
                   help="the example's protocol: grey-level images (not binarized), scored by the "
                        "Bernoulli cross-entropy (likelihood bernoulli_cross_entropy)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    out = Path(a.out or ROOT / "benchmarks" / "results" / ("h200" if a.device == "cuda" else "cpu") / "structured_cvae.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    res = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    res.update(
        figure="conditional NLL -log p(x_missing | x_given), nats per MNIST test image, 1/2/3 given quadrants",
        device=a.device, commit=git_commit(), minutes=a.minutes, eval_k=a.eval_k,
        eval_points=a.eval_points, date=datetime.now(UTC).strftime("%Y-%m-%d"),
        machine=platform.machine(), torch_threads=torch.get_num_threads(),
        command="python benchmarks/structured_cvae.py " + " ".join(sys.argv[1:]),
        published=PUBLISHED, patience=a.patience,
    )

    def save() -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=2))
        tmp.replace(out)

    counts = [[int(g)] for g in a.counts.split(",")] if a.separate else [[1, 2, 3]]
    share = {"baseline": a.baseline_share, "cvae": 1 - a.baseline_share}
    res.update(baseline_prior=a.baseline_prior, separate=a.separate,
               data=("grey levels, Bernoulli cross-entropy" if a.grey
                     else "binarized (training afresh every batch, test once, seeded), Bernoulli"))
    grey = ['data.binarize="none"', 'model.likelihood={kind="bernoulli_cross_entropy"}'] if a.grey else []
    for given in counts:
        suffix = "" if not a.separate else f"_given{given[0]}"
        base_model = None
        # the CVAE reads the baseline's weights: retrain a finished baseline if its CVAE is not
        need_base = a.baseline_prior and not res["runs"].get("cvae" + suffix, {}).get("finished")
        for name, kind in (("baseline", "cvae_baseline"), ("cvae", "cvae")):
            key = name + suffix
            sets = [f"model.kind={json.dumps(kind)}", f"train.epochs={a.epochs}",
                    f"train.device={json.dumps(a.device)}", f"model.given={json.dumps(given)}", *grey, *a.set]
            if a.root:
                sets.append(f"data.root={json.dumps(a.root)}")
            if kind == "cvae":
                sets += a.cvae_set
            if kind == "cvae" and a.baseline_prior:  # the baseline trained above, copied in
                sets.append('model.baseline_run="(the baseline trained above)"')
            cfg = load_config(ROOT / "examples" / "configs" / "mnist_cvae.toml", sets)
            pyro.set_rng_seed(cfg.train.seed)
            data = load_data(cfg.data, seed=cfg.train.seed)
            model = build_model(cfg, data.shape)
            device = resolve_device(cfg.train.device)
            if kind == "cvae_baseline":
                base_model = model
            if res["runs"].get(key, {}).get("finished") and not (kind == "cvae_baseline" and need_base):
                continue
            if kind == "cvae" and a.baseline_prior:
                model.baseline.load_weights(base_model.net.state_dict())
            rows: list = []
            res["runs"][key] = {"kind": kind, "given": given, "epochs": rows, "finished": False}
            t0 = time.time()
            budget = a.minutes * 60 * share[name] / len(counts)
            stop = Deadline(budget, rows, save, a.patience)
            trainer = Trainer(model, cfg.train, data.x_train, data.x_val, dynamic_binarize=cfg.data.binarize == "dynamic",
                              device=device, callbacks=[stop], progress=False)
            trainer.train()
            train_s = time.time() - t0
            best_epoch = stop.restore_best(model)
            model.eval()
            x_test = data.x_test[: a.eval_points].to(device)
            t1 = time.time()
            m = model.metrics(x_test, samples=a.eval_k)
            res["runs"][key].update(finished=True, train_seconds=round(train_s, 1),
                                    eval_seconds=round(time.time() - t1, 1),
                                    epochs_completed=len(trainer.history), scored_epoch=best_epoch or len(trainer.history), **m)
            print(f"{key}: {m['conditional_nll']} (ELBO: {m['conditional_nll_elbo']}) after "
                  f"{len(trainer.history)} epochs, {train_s:.0f} s", flush=True)
            save()
    if a.separate:  # each count's figure from its own models
        res["summary"] = {
            name: {str(g): res["runs"].get(f"{name}_given{g}", {}).get("conditional_nll", {}).get(str(g))
                   for g in (1, 2, 3)}
            for name in ("baseline", "cvae")
        }
        save()
        print(json.dumps(res["summary"]))
    else:
        print(json.dumps({k: v.get("conditional_nll") for k, v in res["runs"].items()}))


if __name__ == "__main__":
    main()
