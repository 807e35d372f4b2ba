"""The training step recorded as a CUDA graph (`train.cuda_graph = true`) against the eager step
and the hand-written eager PyTorch VAE, on one GPU.

    python benchmarks/cuda_graph_step.py --device cuda --root /path/to/mnist --out cuda_graph.json
    python benchmarks/cuda_graph_step.py --device cuda --quick      # ~1 minute, random data

The model is `train_speed.py`'s: 784-400-50 softplus MLPs, Bernoulli likelihood, dynamically
binarized MNIST (or uniform grey levels without `--root`), batch 128, Adam 1e-3. Parts, each
in its own try/except (a failure is reported in the JSON under `errors` and the rest still runs):

1. `agreement`: two trainers from the same weights, optimizer state, batches and CUDA RNG state,
   one eager and one graphed, `--check-steps` steps; the per-step losses must agree (the
   graph replays the same kernels with the same Philox noise): max |difference| and a verdict
   against `--tol` (relative). `step0_same_noise` locates a difference: step 0's loss from the
   same RNG state by Pyro's eager ELBO, by the recorded estimator (`CapturableELBO`) run
   eagerly, and by the first replay.
2. `speed`: ms per step of `eager` (`Trainer.step`, Pyro validation off as on the trainer's
   later steps), `graphed` (the same with `cuda_graph = true`) and `handwritten`
   (`train_speed.Handwritten`, the like-for-like plain PyTorch loop), `--steps` steps per
   repeat, interleaved, median over `--repeats`; ratios against `handwritten` (target of the
   issue: graphed <= 1.15).
3. `rollback`: `Trainer.train` for one epoch with the graph, a parameter set to NaN after step
   20 (through the public `Callback.on_step_end` seam): the epoch must be rolled back and
   redone (one retry), ending with finite parameters.
4. `epoch`: `Trainer.train`, one epoch each, eager vs graphed: seconds and train ELBO.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import pyro  # noqa: E402
import torch  # noqa: E402

import pyrovae  # noqa: E402
from pyrovae.data import bernoulli  # noqa: E402
from pyrovae.train import Callback, Trainer  # noqa: E402

RESULT: dict = {"errors": {}}


def part(name):
    def wrap(fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                RESULT[name] = fn(*a, **k)
            except Exception as e:  # noqa: BLE001 - report and go on
                RESULT["errors"][name] = f"{type(e).__name__}: {e}"
                RESULT.setdefault("tracebacks", {})[name] = traceback.format_exc()[-3000:]
                print(f"[{name}] FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            RESULT.setdefault("part_seconds", {})[name] = round(time.perf_counter() - t0, 2)
        return run
    return wrap


def config(root: str, graph: bool, epochs: int = 1):
    return pyrovae.load_config({
        "data": {"dataset": "mnist", "root": root, "binarize": "dynamic"} if root else {},
        "model": {
            "latent_dim": 50,
            "encoder": {"kind": "mlp", "hidden": [400], "activation": "softplus"},
            "decoder": {"kind": "mlp", "hidden": [400], "activation": "softplus"},
            "likelihood": {"kind": "bernoulli"},
        },
        "train": {"batch_size": 128, "epochs": epochs, "device": "cuda", "cuda_graph": graph},
    })


def load(root: str, device: str) -> torch.Tensor:
    if root:
        data = pyrovae.load_data(config(root, False).data)
        return data.x_train.to(device)
    g = torch.Generator().manual_seed(0)
    return torch.rand(54000, 784, generator=g).to(device)  # grey levels, binarized per batch


def trainer(root, x, graph, state=None, callbacks=(), epochs=1, seed=0) -> Trainer:
    cfg = config(root, graph, epochs)
    pyro.set_rng_seed(seed)
    vae = pyrovae.build_model(cfg, (1, 28, 28))
    if state is not None:
        vae.load_state_dict(state)
    t = Trainer(vae, cfg.train, x, None, dynamic_binarize=True, device=x.device,
                callbacks=list(callbacks), progress=False)
    t.perm = torch.randperm(len(x), generator=t.gen, device=x.device)
    return t


def steps(t: Trainer, first: int, n: int) -> list[torch.Tensor]:
    out = []
    with pyro.validation_enabled(False):
        for s in range(first, first + n):
            out.append(t.step(t.batch(s % (len(t.x_train) // 128)), check=False))
    return out


@part("agreement")
def agreement(root, x, n, tol):
    torch.manual_seed(1)
    eager = trainer(root, x, False)
    state = {k: v.clone() for k, v in eager.model.state_dict().items()}
    graphed = trainer(root, x, True, state)
    rng = torch.cuda.get_rng_state()
    # where a difference would come from, on step 0's batch and the same CUDA RNG state, no
    # update: Pyro's eager ELBO vs the recorded estimator run eagerly (the estimator), and the
    # latter vs the first replay (the graph's noise)
    gen_state = eager.noise_gen.get_state()  # the probe's binarization must not move the stream
    x0 = eager.batch(0)
    eager.noise_gen.set_state(gen_state)
    probe = {}
    with pyro.validation_enabled(False), torch.no_grad():
        for name, fn in (("pyro_eager", eager.loss_fn), ("capturable_eager", graphed.graph.loss_fn)):
            torch.cuda.set_rng_state(rng)
            probe[name] = fn(x0, eager.n, eager.beta, eager.noise_gen).item()
    torch.cuda.set_rng_state(rng)
    a = torch.stack(steps(eager, 0, n)).double().cpu()
    torch.cuda.set_rng_state(rng)
    b = torch.stack(steps(graphed, 0, n)).double().cpu()
    rel = ((a - b).abs() / a.abs().clamp_min(1e-12)).max().item()
    return {
        "steps": n, "eager_first_last": [a[0].item(), a[-1].item()],
        "graphed_first_last": [b[0].item(), b[-1].item()],
        "max_abs_diff": (a - b).abs().max().item(), "max_rel_diff": rel, "tolerance": tol,
        "ok": bool(rel <= tol), "captures": graphed.graph.captures,
        "step0_same_noise": {**probe, "graphed_replay": b[0].item()},
    }


@part("speed")
def speed(root, x, n, repeats):
    from train_speed import Handwritten

    runners = {"eager": trainer(root, x, False), "graphed": trainer(root, x, True)}
    torch.manual_seed(0)
    net = Handwritten(analytic=False).to(x.device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
    gen = torch.Generator(device=x.device).manual_seed(0)
    perm = torch.randperm(len(x), generator=gen, device=x.device)

    def hand(first, k):
        for s in range(first, first + k):
            s %= len(x) // 128
            xb = bernoulli(x.index_select(0, perm[s * 128 : (s + 1) * 128]), gen)
            opt.zero_grad(set_to_none=True)
            loss = net.loss(xb, len(x))
            loss.backward()
            opt.step()

    run = {"eager": lambda f, k: steps(runners["eager"], f, k),
           "graphed": lambda f, k: steps(runners["graphed"], f, k), "handwritten": hand}
    for fn in run.values():  # warm-up (and the graph's capture)
        fn(0, 20)
    torch.cuda.synchronize()
    times = {k: [] for k in run}
    for r in range(repeats):
        for name in list(run)[r % 3:] + list(run)[: r % 3]:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            run[name](20 + r * n, n)
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) / n * 1e3)
    ms = {k: statistics.median(v) for k, v in times.items()}
    return {
        "ms_per_step_median": ms, "ms_per_step_all": times, "steps_per_repeat": n,
        "ratio_eager_vs_handwritten": ms["eager"] / ms["handwritten"],
        "ratio_graphed_vs_handwritten": ms["graphed"] / ms["handwritten"],
        "target_graphed_ratio": 1.15,
    }


class NaNAfter(Callback):
    def __init__(self, n):
        self.n, self.calls = n, 0

    def on_step_end(self, trainer, loss):
        self.calls += 1
        if self.calls == self.n:
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))


@part("rollback")
def rollback(root, x):
    t = trainer(root, x[:128 * 60], True, callbacks=[NaNAfter(20)])
    t.perm = None
    ok = t.train()
    finite = all(bool(torch.isfinite(p).all()) for p in t.model.parameters())
    return {"finished": ok, "retries": t.retries, "finite_parameters": finite,
            "captures": t.graph.captures, "ok": bool(ok and t.retries == 1 and finite)}


@part("epoch")
def epoch(root, x):
    out = {}
    for graph in (False, True):
        t = trainer(root, x, graph)
        t.perm = None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        t.train()
        torch.cuda.synchronize()
        out["graphed" if graph else "eager"] = {
            "seconds": time.perf_counter() - t0, "train_elbo": t.history[-1]["train_elbo"],
            "epoch_seconds": t.history[-1]["epoch_seconds"],
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--root", default="", help="MNIST IDX folder ('' = uniform random grey levels)")
    p.add_argument("--quick", action="store_true", help="fewer steps (about a minute)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--check-steps", type=int, default=50)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    RESULT.update(argv=sys.argv[1:], torch=torch.__version__, pyro=pyro.__version__,
                  date=time.strftime("%Y-%m-%d %H:%M:%S"))
    if a.device != "cuda" or not torch.cuda.is_available():
        RESULT["errors"]["device"] = f"needs --device cuda and a GPU (cuda available: {torch.cuda.is_available()})"
    else:
        RESULT["device_name"] = torch.cuda.get_device_name()
        n = a.steps or (100 if a.quick else 400)
        reps = a.repeats or (2 if a.quick else 5)
        x = None
        try:
            x = load(a.root, "cuda")
        except Exception as e:  # noqa: BLE001
            RESULT["errors"]["data"] = f"{type(e).__name__}: {e}"
        if x is not None:
            RESULT["data"] = "mnist" if a.root else "uniform grey levels"
            agreement(a.root, x, a.check_steps, a.tol)
            speed(a.root, x, n, reps)
            rollback(a.root, x)
            if not a.quick:
                epoch(a.root, x)
    text = json.dumps(RESULT, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
