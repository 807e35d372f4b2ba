"""`pyrovae.networks.forward_concat` against the network run on the concatenated input.

Structured models feed a network `[a, b]`: M2's $q(z \\mid x, y)$ reads an image and a one-hot
label, and with $y$ enumerated over 10 classes the image is repeated 10 times; a CVAE's decoder
reads $[z, c]$, and under $K$ importance samples the 784-pixel condition is repeated $K$
times. `forward_concat` computes the first affine layer's part on each input at that input's
own batch shape and adds them with broadcasting. Timed here, same weights on both sides (the
plain side puts an `nn.Identity` in front of the same layers, so `forward_concat` falls back
to concatenating):

1. an M2 training step (`mnist_m2.toml` networks: 784-500-10 classifier, [784+10]-500-100
   encoder, [50+10]-500-784 decoder; `TraceEnum_ELBO`, batch 200 with 10 labelled points,
   loss + backward + Adam);
2. a quadrant CVAE's IWAE bound (`mnist_cvae.toml` networks, 1 given quadrant, K = 64
   importance samples, 256 images).

Random MNIST-shaped binary data (the cost does not depend on the values). Interleaved
blocks, median of per-repeat ratios (`forward_concat` time / plain time), one thread.

```bash
python benchmarks/forward_concat_speed.py --repeats 7 --json benchmarks/results/cpu/forward_concat_speed.json
```
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pyro  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import pyrovae  # noqa: E402
from pyrovae import evaluate  # noqa: E402
from pyrovae.build import build_model  # noqa: E402
from pyrovae.objectives import make_loss  # noqa: E402


def plain(net: nn.Module) -> nn.Sequential:
    """The same layers (same parameter tensors) behind an Identity: the concatenating path."""
    layers = list(net) if isinstance(net, nn.Sequential) else [net]
    return nn.Sequential(nn.Identity(), *layers)


def m2_step(fast: bool):
    cfg = pyrovae.load_config(ROOT / "examples/configs/mnist_m2.toml")
    torch.manual_seed(0)
    m = build_model(cfg, (1, 28, 28))
    if not fast:
        m.encoder_z, m.decoder = plain(m.encoder_z), plain(m.decoder)
    loss = make_loss(m, "trace_enum")
    opt = torch.optim.Adam(m.parameters(), lr=4.2e-4)
    x = torch.bernoulli(torch.full((200, 784), 0.3))
    y = torch.full((200,), -1, dtype=torch.long)
    y[:10] = torch.arange(10)

    def step():
        opt.zero_grad()
        loss(x, 50_000, 1.0, None, y).backward()
        opt.step()

    return step


def cvae_iwae(fast: bool):
    cfg = pyrovae.load_config(ROOT / "examples/configs/mnist_cvae.toml", ["model.given=[1]"])
    torch.manual_seed(0)
    m = build_model(cfg, (1, 28, 28)).eval()
    if not fast:
        m.encoder, m.decoder = plain(m.encoder), plain(m.decoder)
    x = torch.bernoulli(torch.full((256, 784), 0.3))

    def run():
        with torch.no_grad():
            evaluate.log_likelihood(partial(m.model, given=1), partial(m.guide, given=1), x, 64)

    return run


def timed(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=10, help="M2 steps per block")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    out = {"threads": 1, "repeats": a.repeats, "date": time.strftime("%Y-%m-%d"),
           "command": "python benchmarks/forward_concat_speed.py " + " ".join(sys.argv[1:])}
    for name, make, n in (("m2_step", m2_step, a.steps), ("cvae_iwae_k64_256", cvae_iwae, 1)):
        fns = {True: make(True), False: make(False)}
        for f in fns.values():  # warm-up
            f()
        ratios, times = [], {True: [], False: []}
        for r in range(a.repeats):
            order = (True, False) if r % 2 == 0 else (False, True)
            t = {k: timed(fns[k], n) for k in order}
            ratios.append(t[True] / t[False])
            for k in t:
                times[k].append(t[k])
        out[name] = {
            "ratio_median": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)],
            "forward_concat_ms": 1e3 * statistics.median(times[True]),
            "concatenated_ms": 1e3 * statistics.median(times[False]),
        }
        print(name, json.dumps(out[name]), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
