"""Training from a folder of PNGs read lazily against decoded in memory: peak RSS and throughput.

Writes the 70,000 MNIST digits (`--root`, the four IDX files; or, without it, `--images`
random 28x28 grey images) as 28x28 greyscale PNGs, one subfolder per class, under `--dir`,
then trains a VAE (784-400-50, Bernoulli likelihood, dynamic binarization, batch 128) for
`--steps` steps from it twice, interleaved `--repeats` times, in fresh child processes (the
child of `memmap_rss.py`):

* `never`: the folder decoded whole into memory (`data.memory_map = "never"`), as before;
* `always`: the folder read lazily (`pyrovae.data.ImageFiles`): the headers read once, every
  image decoded once by the streaming check, validation and test decoded into memory, and the
  training split kept on disk as a `MappedRows` whose minibatches decode their 128 PNGs.

Reported per run: the peak resident set (`VmHWM` of the child: loading, the checks and
training together), steps per second after 20 warm-up steps, and the seconds to load and check.
Validation and test are 1 % each. Then, in this process, the median time to gather one
minibatch of 128 random training rows (`x_train.index_select`), in memory and lazily: the cost
the lazy path adds to every step, without the noise of whole training steps on a shared
machine. Every file written is deleted at the end.

    python benchmarks/imagefolder_rss.py --dir /path/with/space --root <mnist-root> \\
        --out benchmarks/results/cpu/imagefolder_rss.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from memmap_rss import child, save_results, summary  # noqa: E402  (the same child process and summary)


def write_pngs(folder: Path, root: str | None, images: int, seed: int = 0) -> dict:
    """Write 28x28 greyscale PNGs, `folder/<label>/<index>.png`; return what was written."""
    from PIL import Image

    if root:
        from pyrovae.data import read_idx

        r = Path(root)

        def idx(stem: str) -> np.ndarray:
            return read_idx(r / f"{stem}.gz" if (r / f"{stem}.gz").exists() else r / stem)

        x = np.concatenate([idx("train-images-idx3-ubyte"), idx("t10k-images-idx3-ubyte")])
        y = np.concatenate([idx("train-labels-idx1-ubyte"), idx("t10k-labels-idx1-ubyte")])
    else:
        rng = np.random.default_rng(seed)
        x = rng.integers(0, 256, (images, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, images)
    for c in np.unique(y):
        (folder / str(int(c))).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i, (img, c) in enumerate(zip(x, y, strict=True)):
        Image.fromarray(img, "L").save(folder / str(int(c)) / f"{i:06d}.png")
    files = list(folder.rglob("*.png"))
    return {
        "images": len(files),
        "source": "MNIST train + test" if root else "uniform random grey levels",
        "png_bytes": sum(f.stat().st_size for f in files),
        "decoded_uint8_gb": x.nbytes / 1e9,
        "write_seconds": time.perf_counter() - t0,
    }


def gather_ms(folder: Path, threads: int, batches: int = 300, batch: int = 128) -> dict:
    """Median milliseconds to gather `batch` random training rows, per `data.memory_map`."""
    import statistics

    import torch

    from pyrovae.data import DataConfig, load_data

    torch.set_num_threads(threads)
    out = {}
    for mode in ("never", "always"):
        cfg = DataConfig(dataset=str(folder), binarize="dynamic", memory_map=mode,
                         val_fraction=0.01, test_fraction=0.01)
        x = load_data(cfg, seed=0).x_train
        g = torch.Generator().manual_seed(0)
        times = []
        for _ in range(batches):
            idx = torch.randint(len(x), (batch,), generator=g)
            t0 = time.perf_counter()
            x.index_select(0, idx)
            times.append(time.perf_counter() - t0)
        out[mode] = {"median_ms": 1e3 * statistics.median(times),
                     "quartiles_ms": [1e3 * q for q in statistics.quantiles(times, n=4)]}
        del x
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="folder for the temporary PNGs (~0.3 GB)")
    p.add_argument("--root", default=None, help="folder with the four MNIST IDX files")
    p.add_argument("--images", type=int, default=70_000, help="random images, without --root")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="runs of each (interleaved); medians")
    p.add_argument("--out", default=None, help="JSON file for the results")
    a = p.parse_args()
    argv = [
        "<tmp>" if v == a.dir else "<mnist-root>" if a.root and v == a.root else v
        for v in sys.argv[1:]
    ]
    results: dict = {"date": time.strftime("%Y-%m-%d"), "argv": argv}

    def save() -> None:
        save_results(results, a.out)

    with tempfile.TemporaryDirectory(dir=a.dir, prefix="pyrovae-images-") as tmp:
        folder = Path(tmp) / "pngs"
        results["folder"] = write_pngs(folder, a.root, a.images)
        save()
        runs: dict[str, list[dict]] = {"never": [], "always": []}
        for _ in range(a.repeats):  # interleaved: a burst of load hits both alike
            for mode in ("never", "always"):
                runs[mode].append(child(folder, mode, a.steps, a.threads))
                results[mode] = summary(runs[mode])
                save()
        results["gather_128_rows"] = gather_ms(folder, a.threads)
        save()
    results["files_deleted"] = True
    save()


if __name__ == "__main__":
    main()
