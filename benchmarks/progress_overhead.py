"""Cost of progress reporting: training epochs with the per-epoch log line and the tqdm bar on,
against the same epochs with both off, interleaved in one process (digits, 2 threads).

    python benchmarks/progress_overhead.py --json

The bar is forced on (`progress=True`, drawn into a discarded stream) so the measurement
includes its per-step updates, which is what a terminal user pays.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import pyrovae  # noqa: E402
from pyrovae.progress import configure, log  # noqa: E402
from pyrovae.train import Trainer  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    cfg = pyrovae.load_config({"data": {"dataset": "digits"}, "train": {"epochs": 1000, "device": "cpu", "batch_size": 32}})
    data = pyrovae.load_data(cfg.data, seed=0)
    sink = io.StringIO()
    configure(0)
    trainers = {}
    for name, on in (("on", True), ("off", False)):
        model = pyrovae.build_model(cfg, data.shape)
        trainers[name] = Trainer(model, cfg.train, data.x_train, data.x_val, progress=on)
    import tqdm.auto

    times = {"on": [], "off": []}
    for rep in range(a.repeats):
        for name in (("on", "off") if rep % 2 == 0 else ("off", "on")):
            tr = trainers[name]
            log.setLevel(logging.INFO if name == "on" else logging.WARNING)
            tr.config.epochs = tr.epoch + 1
            orig = sys.stderr
            sys.stderr = sink  # the bar draws into the sink
            t0 = time.perf_counter()
            tr.train()
            times[name].append(time.perf_counter() - t0)
            sys.stderr = orig
    ratio = statistics.median(a / b for a, b in zip(times["on"], times["off"], strict=True))
    res = {"overhead_ratio": ratio, "epoch_seconds": {k: statistics.median(v) for k, v in times.items()},
           "log_lines": sink.getvalue().count("pyrovae: epoch "), "tqdm": tqdm.auto.tqdm.__module__}
    print(json.dumps(res, indent=1) if a.json else res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
