"""Cost of TensorBoard logging (`pyrovae.tblog.TensorBoardLogger`, `train.log = true`, the
default): training epochs with the logger against the same epochs without, interleaved in one
process.

    python benchmarks/tensorboard_overhead.py --json                          # digits, default config
    python benchmarks/tensorboard_overhead.py --config examples/configs/mnist_vae.toml \\
        --root /path/with/the/four/idx/files --epochs-per-repeat 1 --repeats 5 --json

Two trainers are built from the same seed; each repeat trains one epoch (or
`--epochs-per-repeat`) with each, in alternating order, and times it, the logger's per-epoch
work (ELBO parts and KL per dimension on 256 validation points, the images, the flush to the
event file) included. Results: the seconds spent inside the logger's hooks (wall and CPU) as a
share of the training time without it — the direct measure, little disturbed by a busy
machine —, and the median of the per-repeat ratios (logged / not logged) and
the ratio of the totals, in wall-clock time and in CPU time of this process
(`time.process_time`, less disturbed by other processes on a shared machine), at the default
interval (`train.log_every`, 50 steps) unless `--log-every` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import pyrovae  # noqa: E402
from pyrovae.tblog import TensorBoardLogger, parts_data  # noqa: E402
from pyrovae.train import Callback, Trainer  # noqa: E402


class Timed:
    """Wraps the logger's hooks and sums the wall and CPU seconds spent inside them (a direct
    measure of its cost, insensitive to how long the epochs around it take on a busy machine;
    the event writer's background thread is not included)."""

    def __init__(self, logger: TensorBoardLogger) -> None:
        self.logger, self.wall, self.cpu = logger, 0.0, 0.0
        for hook in ("on_step_end", "on_epoch_end"):
            setattr(self, hook, self._wrap(getattr(logger, hook)))

    def _wrap(self, fn):
        def hook(*args):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args)
            finally:
                self.wall += time.perf_counter() - t0
                self.cpu += time.process_time() - c0

        return hook

    def on_loss(self, trainer, loss):
        return loss


class StopAt(Callback):
    """Stops training after epoch `until` (so `train.epochs` stays far away: the logger's
    last-epoch rule does not fire on every repeat)."""

    until = 0

    def on_epoch_end(self, trainer: Trainer) -> None:
        if trainer.epoch >= self.until:
            trainer.request_stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="TOML config (default: the built-in digits config)")
    p.add_argument("--root", default=None, help="MNIST folder for an mnist config")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--epochs-per-repeat", type=int, default=1)
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    sets = ["train.device=\"cpu\"", "train.epochs=100000"]
    if a.root:
        sets.append(f"data.root={json.dumps(a.root)}")
    if a.log_every:
        sets.append(f"train.log_every={a.log_every}")
    cfg = pyrovae.load_config(a.config, sets)
    data = pyrovae.load_data(cfg.data, seed=cfg.train.seed)
    tmp = Path(tempfile.mkdtemp(prefix="tb_overhead."))
    try:
        trainers, loggers, stoppers = {}, {}, {}
        for name in ("on", "off"):
            torch.manual_seed(cfg.train.seed)
            model = pyrovae.build_model(cfg, data.shape)
            stoppers[name] = StopAt()
            cbs = [stoppers[name]]
            if name == "on":
                parts = parts_data(data, cfg.train.seed)
                loggers[name] = TensorBoardLogger(tmp, tuple(data.shape), parts, cfg.train.log_every)
                timed = Timed(loggers[name])
                cbs = [timed, *cbs]
            trainers[name] = Trainer(
                model, cfg.train, data.x_train, data.x_val,
                dynamic_binarize=data.binarize == "dynamic", callbacks=cbs, progress=False,
            )  # fmt: skip
        times: dict[str, list[float]] = {"on": [], "off": []}
        cpu: dict[str, list[float]] = {"on": [], "off": []}
        for name in ("on", "off"):  # warm-up epoch (imports, first event file)
            stoppers[name].until = trainers[name].epoch + 1
            trainers[name].train()
        timed.wall = timed.cpu = 0.0
        for rep in range(a.repeats):
            for name in ("on", "off") if rep % 2 == 0 else ("off", "on"):
                tr = trainers[name]
                stoppers[name].until = tr.epoch + a.epochs_per_repeat
                tr.stop_requested = None
                t0, c0 = time.perf_counter(), time.process_time()
                tr.train()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        loggers["on"].close()
        n_events = sum(f.stat().st_size for f in (tmp / "tb").iterdir())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = statistics.median(x / y for x, y in zip(times["on"], times["off"], strict=True))
    total = sum(times["on"]) / sum(times["off"])
    cpu_ratio = statistics.median(x / y for x, y in zip(cpu["on"], cpu["off"], strict=True))
    cpu_total = sum(cpu["on"]) / sum(cpu["off"])
    steps = -(-len(data.x_train) // cfg.train.batch_size)
    res = {
        "overhead_ratio": ratio,
        "overhead_percent": 100 * (ratio - 1),
        "total_ratio": total,
        "in_logger_seconds": timed.wall,
        "in_logger_share_of_training": timed.wall / sum(times["off"]),
        "in_logger_cpu_share_of_training": timed.cpu / sum(cpu["off"]),
        "cpu_overhead_ratio": cpu_ratio,
        "cpu_total_ratio": cpu_total,
        "heavy_epochs": f"{loggers['on'].heavy_count} of {trainers['on'].epoch}",
        "seconds_per_repeat": {k: statistics.median(v) for k, v in times.items()},
        "dataset": cfg.data.dataset,
        "steps_per_epoch": steps,
        "epochs_per_repeat": a.epochs_per_repeat,
        "log_every": cfg.train.log_every,
        "event_file_bytes": n_events,
        "repeats": a.repeats,
        "threads": a.threads,
    }
    print(json.dumps(res, indent=1) if a.json else res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
