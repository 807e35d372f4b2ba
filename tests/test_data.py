"""Tests for :mod:`pyrovae.data`: built-in sets, real MNIST IDX files, arrays, image folders."""

from __future__ import annotations

import gzip
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import pyrovae.data as data_mod
from pyrovae.data import IDX_FILES, DataConfig, Dataset, load_data, read_idx
from pyrovae.errors import DataError

#: the four original MNIST files (gzipped IDX), for the tests that read the real dataset: the
#: folder named by $PYROVAE_TEST_MNIST (CI sets it), else torchvision's download cache
MNIST_DIR = Path(os.environ.get("PYROVAE_TEST_MNIST") or Path.home() / ".cache/pyrovae/mnist")
# Class counts of the canonical MNIST files.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    """Serialize ``arr`` as an IDX file with the given type code."""
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(dtype).tobytes()


def write_small_idx(folder: Path, n_train: int = 12, n_test: int = 5, gz: bool = True) -> Path:
    """Write a tiny, valid four-file IDX dataset (4x4 images) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 4, 4), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 4, 4), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for stem, arr in arrays.items():
        raw = idx_bytes(arr)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)
    return folder


def mnist_cfg(root: Path | str, **kw: object) -> DataConfig:
    return DataConfig(dataset="mnist", root=str(root), **kw)


def row_pairs(x: torch.Tensor, y: torch.Tensor) -> Counter:
    """Multiset of (datapoint, label) pairs, for checking that splits keep x and y aligned."""
    keys = (x * 16).round().to(torch.int64).numpy()
    return Counter((row.tobytes(), int(label)) for row, label in zip(keys, y.numpy(), strict=True))


def write_png(path: Path, size: tuple[int, int], mode: str = "L", value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color: int | tuple[int, int, int] = value if mode == "L" else (value, value // 2, 255 - value)
    Image.new(mode, size, color).save(path)


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------


def test_config_defaults_and_constraints() -> None:
    cfg = DataConfig()
    assert (cfg.dataset, cfg.root, cfg.binarize, cfg.limit) == ("digits", "", "none", 0)
    for bad in (
        {"val_fraction": 0.5},
        {"val_fraction": -0.1},
        {"test_fraction": 0.0},
        {"test_fraction": 0.5},
        {"limit": -1},
        {"binarize": "sometimes"},
        {"datset": "mnist"},  # extra keys are forbidden
    ):
        with pytest.raises(pydantic.ValidationError):
            DataConfig(**bad)
    assert DataConfig(val_fraction=0.0).val_fraction == 0.0


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------


def test_digits_shapes_range_labels_and_sizes() -> None:
    from sklearn.datasets import load_digits

    ds = load_data(DataConfig(), seed=0)
    assert isinstance(ds, Dataset)
    assert ds.name == "digits" and ds.shape == (1, 8, 8) and ds.dim == 64
    n_test = round(1797 * 0.2)
    n_val = round((1797 - n_test) * 0.1)
    assert ds.x_test.shape == (n_test, 64)
    assert ds.x_val.shape == (n_val, 64)
    assert ds.x_train.shape == (1797 - n_test - n_val, 64)
    for x in (ds.x_train, ds.x_val, ds.x_test):
        assert x.dtype == torch.float32 and x.is_contiguous()
        assert x.min() >= 0.0 and x.max() <= 1.0
    assert ds.x_train.max() == 1.0
    for y, x in ((ds.y_train, ds.x_train), (ds.y_val, ds.x_val), (ds.y_test, ds.x_test)):
        assert y is not None and y.dtype == torch.int64 and y.shape == (x.shape[0],)
        assert 0 <= y.min() and y.max() <= 9
    # The splits are a partition of the original (image, label) pairs: nothing lost, x/y aligned.
    ref = load_digits()
    ref_pairs = row_pairs(torch.from_numpy(ref.data / 16.0), torch.from_numpy(ref.target))
    got = Counter()
    for x, y in ((ds.x_train, ds.y_train), (ds.x_val, ds.y_val), (ds.x_test, ds.y_test)):
        got += row_pairs(x, y)
    assert got == ref_pairs


def test_digits_split_is_reproducible_and_seed_dependent() -> None:
    a = load_data(DataConfig(), seed=3)
    b = load_data(DataConfig(), seed=3)
    c = load_data(DataConfig(), seed=4)
    for name in ("x_train", "x_val", "x_test", "y_train", "y_val", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.x_train, c.x_train)


def test_val_fraction_zero_gives_empty_validation() -> None:
    ds = load_data(DataConfig(val_fraction=0.0))
    assert ds.x_val.shape == (0, 64) and ds.y_val is not None and ds.y_val.shape == (0,)
    assert ds.x_train.shape[0] + ds.x_test.shape[0] == 1797


def test_limit() -> None:
    ds = load_data(DataConfig(limit=40))
    assert ds.x_train.shape[0] == 40 and ds.x_val.shape[0] == 10 and ds.x_test.shape[0] == 10
    full = load_data(DataConfig())
    assert torch.equal(ds.x_train, full.x_train[:40])  # the first `limit` shuffled points
    tiny = load_data(DataConfig(limit=2))
    assert tiny.x_train.shape[0] == 2 and tiny.x_val.shape[0] == 1 and tiny.x_test.shape[0] == 1


def test_to_device_returns_moved_copy() -> None:
    ds = load_data(DataConfig(limit=8))
    moved = ds.to("cpu")
    assert isinstance(moved, Dataset) and moved is not ds
    assert torch.equal(moved.x_train, ds.x_train) and moved.shape == ds.shape


# ---------------------------------------------------------------------------------------------
# real MNIST
# ---------------------------------------------------------------------------------------------


def _need_mnist() -> None:
    if not all((MNIST_DIR / f"{stem}.gz").is_file() for stem in IDX_FILES):
        pytest.skip(
            f"the real MNIST files are not in {MNIST_DIR}: set PYROVAE_TEST_MNIST to a folder "
            "holding the four train-/t10k- IDX .gz files"
        )


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    _need_mnist()
    return load_data(mnist_cfg(MNIST_DIR), seed=0)


@pytest.fixture(scope="module")
def mnist_plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ungzipped copy of the real MNIST files."""
    _need_mnist()
    folder = tmp_path_factory.mktemp("mnist_plain")
    for stem in IDX_FILES:
        with gzip.open(MNIST_DIR / f"{stem}.gz", "rb") as src, open(folder / stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return folder


def test_real_mnist_shapes_range_and_labels(mnist: Dataset) -> None:
    assert mnist.name == "mnist" and mnist.shape == (1, 28, 28) and mnist.dim == 784
    assert mnist.x_train.shape == (54000, 784)
    assert mnist.x_val.shape == (6000, 784)
    assert mnist.x_test.shape == (10000, 784)
    for x in (mnist.x_train, mnist.x_val, mnist.x_test):
        assert x.dtype == torch.float32 and x.is_contiguous()
        assert x.min() == 0.0 and x.max() == 1.0
    assert mnist.y_train is not None and mnist.y_val is not None and mnist.y_test is not None
    assert mnist.y_train.shape == (54000,) and mnist.y_val.shape == (6000,)
    train_counts = torch.bincount(torch.cat([mnist.y_train, mnist.y_val]), minlength=10)
    assert train_counts.tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(mnist.y_test, minlength=10).tolist() == MNIST_TEST_COUNTS
    # the official test set keeps its order: its first digits are 7, 2, 1, 0, 4
    assert mnist.y_test[:5].tolist() == [7, 2, 1, 0, 4]


def test_read_idx_on_real_mnist() -> None:
    _need_mnist()
    labels = read_idx(MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    images = read_idx(MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8 and images.flags.writeable


def test_ungzipped_copy_and_raw_subfolder(mnist_plain: Path, tmp_path: Path) -> None:
    cfg_kw = {"limit": 500, "binarize": "static"}
    ref = load_data(mnist_cfg(MNIST_DIR, **cfg_kw), seed=1)
    plain = load_data(mnist_cfg(mnist_plain, **cfg_kw), seed=1)
    raw_root = tmp_path / "tv_layout"
    (raw_root / "raw").mkdir(parents=True)
    for stem in IDX_FILES:
        (raw_root / "raw" / stem).symlink_to(mnist_plain / stem)
    raw = load_data(mnist_cfg(raw_root, **cfg_kw), seed=1)
    for ds in (plain, raw):
        for name in ("x_train", "x_val", "x_test", "y_train", "y_val", "y_test"):
            assert torch.equal(getattr(ds, name), getattr(ref, name)), name


def test_mnist_validation_split_is_seeded(mnist: Dataset) -> None:
    again = load_data(mnist_cfg(MNIST_DIR, limit=300), seed=0)
    other = load_data(mnist_cfg(MNIST_DIR, limit=300), seed=1)
    assert torch.equal(again.x_train, mnist.x_train[:300])
    assert torch.equal(again.x_val, mnist.x_val[:75])
    assert torch.equal(again.x_test, mnist.x_test[:75])  # official test set is not shuffled
    assert not torch.equal(other.x_train, again.x_train)
    assert torch.equal(other.x_test, again.x_test)


# ---------------------------------------------------------------------------------------------
# IDX validation
# ---------------------------------------------------------------------------------------------


def test_small_idx_folder_loads(tmp_path: Path) -> None:
    ds = load_data(mnist_cfg(write_small_idx(tmp_path / "d", gz=False), val_fraction=0.25))
    assert ds.shape == (1, 4, 4)
    assert ds.x_train.shape == (9, 16) and ds.x_val.shape == (3, 16) and ds.x_test.shape == (5, 16)


@pytest.mark.parametrize("code", [0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E])
def test_read_idx_dtypes_roundtrip(tmp_path: Path, code: int) -> None:
    arr = np.arange(24).reshape(2, 3, 4) % 100
    path = tmp_path / "a.idx"
    path.write_bytes(idx_bytes(arr, code))
    out = read_idx(path)
    assert out.shape == (2, 3, 4) and np.array_equal(out, arr)
    assert out.dtype.isnative


def test_read_idx_generic_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad.idx"
    path.write_bytes(b"\x12\x34\x56\x78" + bytes(10))
    with pytest.raises(DataError, match=r"bad\.idx.*magic.*0x08.*0x12345678"):
        read_idx(path)
    short = tmp_path / "short.idx"
    short.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="short.idx.*truncated"):
        read_idx(short)


def test_idx_bad_magic(tmp_path: Path) -> None:
    folder = write_small_idx(tmp_path / "d", gz=False)
    labels = folder / "train-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[2:4] = b"\x08\x03"  # an images magic in the labels file
    labels.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.*expected 2049.*got 2051"):
        load_data(mnist_cfg(folder))


@pytest.mark.parametrize("delta,kind", [(-7, "truncated"), (3, "too long")])
def test_idx_wrong_length(tmp_path: Path, delta: int, kind: str) -> None:
    folder = write_small_idx(tmp_path / "d", gz=False)
    images = folder / "t10k-images-idx3-ubyte"
    data = images.read_bytes()
    images.write_bytes(data[:delta] if delta < 0 else data + bytes(delta))
    expected, actual = len(data), len(data) + delta
    with pytest.raises(DataError) as err:
        load_data(mnist_cfg(folder))
    msg = str(err.value)
    assert "t10k-images-idx3-ubyte" in msg and kind in msg
    assert f"expected {expected} bytes" in msg and f"got {actual} bytes" in msg


def test_idx_truncated_inside_gzip(tmp_path: Path) -> None:
    folder = write_small_idx(tmp_path / "d")
    path = folder / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-16]))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*truncated"):
        load_data(mnist_cfg(folder))


@pytest.mark.parametrize("damage", ["cut", "garbage", "not_gzip"])
def test_idx_corrupt_gzip(tmp_path: Path, damage: str) -> None:
    folder = write_small_idx(tmp_path / "d")
    path = folder / "train-labels-idx1-ubyte.gz"
    data = path.read_bytes()
    if damage == "cut":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = data[:10] + b"\xff" * (len(data) - 10)
    else:
        data = b"hello, not gzip"
    path.write_bytes(data)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz.*corrupt gzip"):
        load_data(mnist_cfg(folder))


def test_idx_missing_file_and_folder(tmp_path: Path) -> None:
    folder = write_small_idx(tmp_path / "d")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as err:
        load_data(mnist_cfg(folder))
    msg = str(err.value)
    assert "missing IDX file t10k-labels-idx1-ubyte" in msg
    assert all(stem in msg for stem in IDX_FILES)
    with pytest.raises(DataError, match=r"data\.root.*nowhere.*does not exist"):
        load_data(mnist_cfg(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"data\.root.*no IDX files.*train-images-idx3-ubyte"):
        load_data(mnist_cfg(empty))


def test_idx_count_mismatch(tmp_path: Path) -> None:
    folder = write_small_idx(tmp_path / "d", gz=False)
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(11, dtype=np.uint8)))
    with pytest.raises(DataError) as err:
        load_data(mnist_cfg(folder))
    msg = str(err.value)
    assert "train-images-idx3-ubyte holds 12 images" in msg
    assert "train-labels-idx1-ubyte holds 11 labels" in msg


def test_torchvision_download_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    calls: list[dict] = []

    class OfflineMNIST:
        def __init__(self, **kwargs: object) -> None:
            calls.append(kwargs)
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nURLError")

    monkeypatch.setattr(torchvision.datasets, "MNIST", OfflineMNIST)
    monkeypatch.setattr(data_mod, "_cache_dir", lambda: tmp_path / "cache")
    with pytest.raises(DataError) as err:
        load_data(DataConfig(dataset="mnist"))
    msg = str(err.value)
    assert "download" in msg and "offline" in msg and "data.root" in msg
    assert all(stem in msg for stem in IDX_FILES)
    assert calls and calls[0]["download"] is True
    assert Path(str(calls[0]["root"])) == tmp_path / "cache" / "mnist"


def test_torchvision_cache_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    class NoNetwork:
        def __init__(self, **kwargs: object) -> None:
            raise AssertionError("must not download when the cache holds the files")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", NoNetwork)
    monkeypatch.setattr(data_mod, "_cache_dir", lambda: tmp_path)
    write_small_idx(tmp_path / "fashion-mnist" / "FashionMNIST" / "raw")
    ds = load_data(DataConfig(dataset="fashion-mnist"))
    assert ds.name == "fashion-mnist" and ds.shape == (1, 4, 4)


# ---------------------------------------------------------------------------------------------
# arrays
# ---------------------------------------------------------------------------------------------


def test_npy_counts_are_not_scaled(tmp_path: Path) -> None:
    x = np.random.default_rng(0).poisson(5.0, size=(50, 7)).astype(np.int64)
    path = tmp_path / "counts.npy"
    np.save(path, x)
    ds = load_data(DataConfig(dataset=str(path), val_fraction=0.2, test_fraction=0.2))
    assert ds.name == "counts.npy" and ds.shape == (7,) and ds.y_train is None
    assert ds.x_test.shape == (10, 7) and ds.x_val.shape == (8, 7) and ds.x_train.shape == (32, 7)
    got = torch.cat([ds.x_train, ds.x_val, ds.x_test])
    assert got.dtype == torch.float32
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, x.astype(np.float32).tolist()))


def test_npy_3d_array(tmp_path: Path) -> None:
    path = tmp_path / "imgs.npy"
    np.save(path, np.random.default_rng(0).random((20, 5, 6)))
    ds = load_data(DataConfig(dataset=str(path)))
    assert ds.shape == (1, 5, 6) and ds.x_train.shape[1] == 30


def test_npz_with_labels(tmp_path: Path) -> None:
    x = np.arange(40 * 3, dtype=np.float64).reshape(40, 3)
    y = np.arange(40) % 4
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y)
    ds = load_data(DataConfig(dataset=str(path)))
    assert ds.shape == (3,) and ds.y_train is not None
    for xs, ys in ((ds.x_train, ds.y_train), (ds.x_val, ds.y_val), (ds.x_test, ds.y_test)):
        assert ys is not None and ys.dtype == torch.int64
        assert torch.equal(ys, (xs[:, 0] / 3).to(torch.int64) % 4)  # labels stay aligned


def test_npz_errors(tmp_path: Path) -> None:
    path = tmp_path / "nox.npz"
    np.savez(path, data=np.zeros((5, 2)), labels=np.zeros(5))
    with pytest.raises(DataError, match=r"nox\.npz.*'x'.*\['data', 'labels'\]"):
        load_data(DataConfig(dataset=str(path)))
    path = tmp_path / "badlabels.npz"
    np.savez(path, x=np.zeros((5, 2)), y=np.zeros(4))
    with pytest.raises(DataError, match=r"badlabels\.npz.*\(5,\).*\(4,\)"):
        load_data(DataConfig(dataset=str(path)))
    path = tmp_path / "broken.npz"
    path.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(DataError, match=r"broken\.npz"):
        load_data(DataConfig(dataset=str(path)))
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"obj\.npy"):
        load_data(DataConfig(dataset=str(path)))


def test_nan_and_inf_are_rejected(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((30, 4))
    x[3, 2] = np.nan
    x[7, 0] = np.inf
    x[9, 1] = -np.inf
    path = tmp_path / "nan.npy"
    np.save(path, x)
    with pytest.raises(DataError, match=r"nan\.npy.*3 NaN/inf.*\(3, 2\)"):
        load_data(DataConfig(dataset=str(path)))


def test_empty_data_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "empty.npy"
    np.save(path, np.zeros((0, 5)))
    with pytest.raises(DataError, match=r"empty\.npy.*\(0, 5\)"):
        load_data(DataConfig(dataset=str(path)))
    path = tmp_path / "one.npy"
    np.save(path, np.zeros((1, 5)))
    with pytest.raises(DataError, match=r"one\.npy.*empty training split"):
        load_data(DataConfig(dataset=str(path)))
    folder = tmp_path / "noimages"
    folder.mkdir()
    (folder / "README.txt").write_text("nothing here")
    with pytest.raises(DataError, match="noimages.*found none"):
        load_data(DataConfig(dataset=str(folder)))


def test_unknown_names_and_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.dataset.*digits, mnist, fashion-mnist, kmnist"):
        load_data(DataConfig(dataset="cifar10"))
    with pytest.raises(DataError, match="missing.npy"):
        load_data(DataConfig(dataset=str(tmp_path / "missing.npy")))
    csv = tmp_path / "table.csv"
    csv.write_text("1,2\n3,4\n")
    with pytest.raises(DataError, match=r"table\.csv.*'\.csv'.*\.npy, \.npz"):
        load_data(DataConfig(dataset=str(csv)))
    with pytest.raises(DataError, match=r"data\.root"):
        load_data(DataConfig(dataset="digits", root=str(tmp_path)))


# ---------------------------------------------------------------------------------------------
# image folders
# ---------------------------------------------------------------------------------------------


def test_image_folder_with_class_subfolders(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    per_class = {"cat": 6, "ant": 4, "bee": 5}
    for cls, n in per_class.items():
        for i in range(n):
            write_png(root / cls / f"{i:03d}.png", (5, 3), value=10 * i)
    (root / "notes.txt").write_text("ignored")
    ds = load_data(DataConfig(dataset=str(root), limit=0), seed=0)
    assert ds.name == "imgs" and ds.shape == (1, 3, 5)  # (C, H, W) from a 5x3 (W x H) image
    y = torch.cat([ds.y_train, ds.y_val, ds.y_test])  # type: ignore[list-item]
    # labels are the sorted subfolder index: ant=0, bee=1, cat=2
    assert torch.bincount(y).tolist() == [4, 5, 6]
    x = torch.cat([ds.x_train, ds.x_val, ds.x_test])
    assert x.min() >= 0 and x.max() <= 1 and torch.isclose(x.max(), torch.tensor(50 / 255))


def test_flat_rgb_image_folder(tmp_path: Path) -> None:
    for i in range(8):
        write_png(tmp_path / f"im{i}.png", (4, 4), mode="RGB", value=30 * i)
    ds = load_data(DataConfig(dataset=str(tmp_path)))
    assert ds.shape == (3, 4, 4) and ds.dim == 48 and ds.y_train is None
    x = torch.cat([ds.x_train, ds.x_val, ds.x_test]).reshape(-1, 3, 4, 4)
    red = sorted(x[:, 0, 0, 0].mul(255).round().tolist())
    assert red == [30.0 * i for i in range(8)]
    assert torch.allclose(x[:, 2], 1 - x[:, 0])  # channel order kept


def test_image_folder_mismatched_size_and_mode(tmp_path: Path) -> None:
    for i in range(3):
        write_png(tmp_path / "a" / f"im{i}.png", (4, 4))
    write_png(tmp_path / "a" / "im9.png", (4, 5))
    with pytest.raises(DataError, match=r"im9\.png.*expected 4x4 L.*got 4x5 L"):
        load_data(DataConfig(dataset=str(tmp_path / "a")))
    write_png(tmp_path / "b" / "a.png", (4, 4))
    write_png(tmp_path / "b" / "b.png", (4, 4), mode="RGB")
    with pytest.raises(DataError, match=r"b\.png.*expected 4x4 L.*got 4x4 RGB"):
        load_data(DataConfig(dataset=str(tmp_path / "b")))
    bad = tmp_path / "c"
    write_png(bad / "a.png", (4, 4))
    (bad / "b.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"b\.png.*cannot read image"):
        load_data(DataConfig(dataset=str(bad)))


# ---------------------------------------------------------------------------------------------
# binarization and batches
# ---------------------------------------------------------------------------------------------


def is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


def test_static_binarization_is_fixed() -> None:
    a = load_data(DataConfig(binarize="static"), seed=5)
    b = load_data(DataConfig(binarize="static"), seed=5)
    grey = load_data(DataConfig(), seed=5)
    assert a.binarize == "static"
    for name in ("x_train", "x_val", "x_test"):
        x = getattr(a, name)
        assert is_binary(x) and torch.equal(x, getattr(b, name))
        assert getattr(grey, name).shape == x.shape
    # a binarization of the same images: pixels that are 0 stay 0, pixels that are 1 stay 1
    assert torch.all(a.x_train[grey.x_train == 0] == 0)
    assert torch.all(a.x_train[grey.x_train == 1] == 1)
    batches = list(a.train_batches(256, torch.Generator().manual_seed(0)))
    assert all(is_binary(b) for b in batches)


def test_dynamic_binarization_resamples_train_only() -> None:
    a = load_data(DataConfig(binarize="dynamic"), seed=5)
    b = load_data(DataConfig(binarize="dynamic"), seed=5)
    grey = load_data(DataConfig(), seed=5)
    assert torch.equal(a.x_train, grey.x_train)  # training data stays grey-level
    assert not is_binary(a.x_train)
    for name in ("x_val", "x_test"):
        assert is_binary(getattr(a, name)) and torch.equal(getattr(a, name), getattr(b, name))
    g = torch.Generator().manual_seed(0)
    epoch1 = list(a.train_batches(len(a.x_train), g))
    epoch2 = list(a.train_batches(len(a.x_train), g))
    assert len(epoch1) == 1 and is_binary(epoch1[0]) and is_binary(epoch2[0])
    assert not torch.equal(epoch1[0], epoch2[0])
    # the same generator state gives the same batches (reproducible training)
    again = list(a.train_batches(len(a.x_train), torch.Generator().manual_seed(0)))
    assert torch.equal(again[0], epoch1[0])
    # Bernoulli(p): the mean of a binarized epoch tracks the grey-level mean
    assert abs(epoch1[0].mean().item() - a.x_train.mean().item()) < 0.01


def test_binarize_needs_unit_range(tmp_path: Path) -> None:
    path = tmp_path / "big.npy"
    np.save(path, np.linspace(-0.5, 3.0, 40).reshape(20, 2))
    with pytest.raises(DataError, match=r"data\.binarize.*min -0\.5.*max 3"):
        load_data(DataConfig(dataset=str(path), binarize="static"))
    assert load_data(DataConfig(dataset=str(path))).x_train.max() <= 3.0


def test_train_batches_cover_each_point_once(tmp_path: Path) -> None:
    n = 103
    path = tmp_path / "ids.npy"
    np.save(path, np.stack([np.arange(n), -np.arange(n)], axis=1))
    ds = load_data(DataConfig(dataset=str(path), val_fraction=0.0, test_fraction=0.1))
    n_train = ds.x_train.shape[0]
    g = torch.Generator().manual_seed(1)
    orders = []
    for _ in range(2):
        batches = list(ds.train_batches(16, g))
        assert [len(b) for b in batches] == [16] * (n_train // 16) + [n_train % 16]
        epoch = torch.cat(batches)
        assert torch.equal(epoch[:, 1], -epoch[:, 0])  # rows kept whole
        assert sorted(epoch[:, 0].tolist()) == sorted(ds.x_train[:, 0].tolist())
        orders.append(epoch[:, 0])
    assert not torch.equal(orders[0], orders[1])  # reshuffled each epoch
    with pytest.raises(DataError, match="batch_size"):
        next(ds.train_batches(0, g))


def test_image_folder_layout_and_mode_errors(tmp_path: Path) -> None:
    write_png(tmp_path / "mix" / "x.png", (3, 3))
    write_png(tmp_path / "mix" / "cls" / "y.png", (3, 3))
    with pytest.raises(DataError, match="mix.*either images directly.*or one subfolder"):
        load_data(DataConfig(dataset=str(tmp_path / "mix")))
    (tmp_path / "rgba").mkdir()
    Image.new("RGBA", (3, 3)).save(tmp_path / "rgba" / "x.png")
    with pytest.raises(DataError, match=r"x\.png.*mode 'RGBA'"):
        load_data(DataConfig(dataset=str(tmp_path / "rgba")))
    write_png(tmp_path / "cls" / "a" / "x.png", (3, 3))
    (tmp_path / "cls" / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*found none"):
        load_data(DataConfig(dataset=str(tmp_path / "cls")))


def test_npz_float_labels_must_be_integers(tmp_path: Path) -> None:
    path = tmp_path / "f.npz"
    np.savez(path, x=np.zeros((10, 2)), y=np.linspace(0, 1, 10))
    with pytest.raises(DataError, match=r"f\.npz.*integer labels.*index 1"):
        load_data(DataConfig(dataset=str(path)))
    np.savez(path, x=np.zeros((10, 2)), y=np.arange(10.0))
    ds = load_data(DataConfig(dataset=str(path)))
    assert ds.y_train is not None and ds.y_train.dtype == torch.int64


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=64), st.booleans())
def test_read_idx_never_leaks_raw_exceptions(tmp_path: Path, blob: bytes, gz: bool) -> None:
    path = tmp_path / ("f.gz" if gz else "f")
    path.write_bytes(gzip.compress(blob) if gz else blob)
    try:
        arr = read_idx(path)
    except DataError as e:
        assert str(path) in str(e)
    else:
        assert isinstance(arr, np.ndarray) and arr.ndim == blob[3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1,), (7,), (128, 784), (3, 1, 8, 8)])
def test_fast_bernoulli_draws_what_torch_bernoulli_draws(dtype, shape):
    """The trainer's dynamic binarization (``data.bernoulli``, u < p on CPU) gives torch.bernoulli's
    values bit for bit and leaves the generator in the same state, so seeds reproduce."""
    from pyrovae.data import bernoulli

    p = torch.rand(shape, dtype=dtype)
    p.view(-1)[:1] = 0.0
    p.view(-1)[-1:] = 1.0
    for seed in (0, 1, 12345):
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for _ in range(2):
            want, got = torch.bernoulli(p, generator=g1), bernoulli(p, g2)
            assert got.dtype == dtype and torch.equal(got, want)
        assert torch.equal(g1.get_state(), g2.get_state())
