"""``benchmarks/fastmath.py`` against ATen: time and accuracy of softplus and the Bernoulli log-density.

For each size, in one process with ``torch.set_num_threads(--threads)``: the forward pass without
autograd and forward + backward, ATen's function (``F.softplus``, ``-F.binary_cross_entropy_with_logits``)
against the kernel here (forced on, whatever ``fastmath._fast`` would choose), median of
``--repeats`` timings of ``--calls`` calls each; plus the raw ``log1p``/``log``/``exp`` that explain
the difference, and the largest error of each against float64 in ulp. Run it once as is and once
with ``ATEN_CPU_CAPABILITY=avx2`` to see which ATen build has the unvectorized ``log1p``::

    .venv/bin/python benchmarks/fastmath_kernels.py [--json]
    ATEN_CPU_CAPABILITY=avx2 .venv/bin/python benchmarks/fastmath_kernels.py
    .venv/bin/python benchmarks/fastmath_kernels.py --dtype float64 --sizes 51200
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fastmath  # noqa: E402  (benchmarks/fastmath.py)


def _time(f, calls: int, repeats: int) -> float:
    for _ in range(20):
        f()
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            f()
        runs.append((time.perf_counter() - t) / calls)
    return 1e6 * statistics.median(runs)


def _max_ulp(approx: torch.Tensor, exact: torch.Tensor) -> float:
    finfo = torch.finfo(approx.dtype)
    spacing = exact.abs().clamp_min(finfo.tiny) * finfo.eps
    return float(((approx.double() - exact).abs() / spacing).max())


def measure_size(n: int, g: torch.Generator, calls: int, repeats: int, dtype=torch.float32) -> dict:
    """µs per call of each function on ``n`` elements (logits ~ N(0, 3²), labels ~ Bernoulli(0.5))."""
    x = (torch.randn(n, generator=g) * 3).to(dtype)
    y = (torch.rand(n, generator=g) < 0.5).to(dtype)
    pos = x.abs()
    xg = x.clone().requires_grad_()
    ones = torch.ones(n, dtype=dtype)

    def t(f) -> float:
        return _time(f, calls, repeats)

    def bce(z):
        return F.binary_cross_entropy_with_logits(z, y, reduction="none")

    row: dict = {"numel": n}
    with torch.no_grad():
        row["log1p_us"] = t(lambda: torch.log1p(pos))
        row["log_us"] = t(lambda: torch.log(pos))
        row["exp_us"] = t(lambda: torch.exp(x))
        row["softplus_torch_us"] = t(lambda: F.softplus(x))
        row["softplus_fast_us"] = t(lambda: fastmath.softplus(x))
        row["bernoulli_torch_us"] = t(lambda: bce(x))
        row["bernoulli_fast_us"] = t(lambda: fastmath.bernoulli_log_prob(x, y))
    row["softplus_fwd_bwd_torch_us"] = t(lambda: torch.autograd.grad(F.softplus(xg), xg, ones))
    row["softplus_fwd_bwd_fast_us"] = t(lambda: torch.autograd.grad(fastmath.softplus(xg), xg, ones))
    row["bernoulli_fwd_bwd_torch_us"] = t(lambda: torch.autograd.grad(bce(xg), xg, ones))
    row["bernoulli_fwd_bwd_fast_us"] = t(
        lambda: torch.autograd.grad(fastmath.bernoulli_log_prob(xg, y), xg, ones)
    )
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="6400,16384,51200,100352", help="element counts (128x50, 128x128, 128x400, 128x784)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="of the timed tensors")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    fastmath.SCALAR_LOG1P, fastmath.MIN_NUMEL = True, {"softplus": 0, "bernoulli": 0}
    fastmath.DTYPES = (torch.float32, torch.float64)
    dtype = getattr(torch, a.dtype)  # time the kernels wherever they would run
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in [int(s) for s in a.sizes.split(",")]:
        rows.append(measure_size(n, g, a.calls, a.repeats, dtype))
    # accuracy on a wide range (|x| from 1e-30 to 1e3, and a band around 0), float32
    w = torch.cat([10 ** (torch.rand(10**6, generator=g, dtype=torch.float64) * 33 - 30)
                   * torch.where(torch.rand(10**6, generator=g) < 0.5, -1.0, 1.0).double(),
                   torch.randn(10**6, generator=g, dtype=torch.float64) * 5])
    w32 = w.float()
    exact = F.softplus(w32.double())
    normal = exact >= torch.finfo(torch.float32).tiny
    acc = {
        "softplus_max_ulp_torch": _max_ulp(F.softplus(w32)[normal], exact[normal]),
        "softplus_max_ulp_fast": _max_ulp(fastmath.softplus(w32)[normal], exact[normal]),
    }
    out = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": a.threads, "dtype": a.dtype,
           "torch": torch.__version__, "rows": rows, "accuracy_float32": acc}
    if a.json:
        print(json.dumps(out))
        return 0
    print(f"ATen CPU capability {out['cpu_capability']}, {a.threads} threads, torch {torch.__version__}; µs per call")
    print(f"{'numel':>7} {'log1p':>7} {'log':>6} {'exp':>6} | {'softplus torch':>14} {'fast':>6} | {'fwd+bwd torch':>13} {'fast':>6} | "
          f"{'bernoulli torch':>15} {'fast':>6} | {'fwd+bwd torch':>13} {'fast':>6}")
    for r in rows:
        print(f"{r['numel']:7d} {r['log1p_us']:7.1f} {r['log_us']:6.1f} {r['exp_us']:6.1f} | {r['softplus_torch_us']:14.1f} "
              f"{r['softplus_fast_us']:6.1f} | {r['softplus_fwd_bwd_torch_us']:13.1f} {r['softplus_fwd_bwd_fast_us']:6.1f} | "
              f"{r['bernoulli_torch_us']:15.1f} {r['bernoulli_fast_us']:6.1f} | {r['bernoulli_fwd_bwd_torch_us']:13.1f} "
              f"{r['bernoulli_fwd_bwd_fast_us']:6.1f}")
    print(f"softplus, float32, max error vs float64: torch {acc['softplus_max_ulp_torch']:.2f} ulp, "
          f"fastmath {acc['softplus_max_ulp_fast']:.2f} ulp")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
