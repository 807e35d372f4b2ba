"""Data larger than memory: `.npy` files and folders of shards memory-mapped, folders of images
read lazily (`pyrovae.data.ImageFiles`), the training split gathered per minibatch from disk
(`pyrovae.data.MappedRows`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

import pyrovae
from pyrovae.data import (
    DataConfig,
    ImageFiles,
    MappedRows,
    data_changes,
    fingerprint,
    load_data,
    open_image_folder,
)
from pyrovae.errors import DataError


@pytest.fixture
def grey(tmp_path):
    x = np.random.default_rng(0).random((300, 1, 4, 4), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    return tmp_path, x


def test_mapped_split_is_the_in_memory_split(grey):
    d, x = grey
    mem = load_data(DataConfig(dataset=str(d / "x.npy"), memory_map="never"), seed=3)
    mapped = load_data(DataConfig(dataset=str(d / "x.npy"), memory_map="always"), seed=3)
    assert isinstance(mapped.x_train, MappedRows) and isinstance(mem.x_train, torch.Tensor)
    assert mapped.x_train.shape == mem.x_train.shape
    assert fingerprint(mapped) == fingerprint(mem)  # same splits, same bytes
    idx = torch.tensor([5, 0, 199, 5])
    assert torch.equal(mapped.x_train.index_select(0, idx), mem.x_train.index_select(0, idx))
    assert torch.equal(mapped.x_train[10:20], mem.x_train[10:20])
    # a folder of shards (a .npy and an uncompressed .npz) is the same data as the one file
    (d / "shards").mkdir()
    np.save(d / "shards" / "part0.npy", x[:120])
    np.savez(d / "shards" / "part1.npz", x=x[120:])
    sharded = load_data(DataConfig(dataset=str(d / "shards"), memory_map="always"), seed=3)
    assert fingerprint(sharded) == fingerprint(mem)


def test_training_from_disk_equals_training_in_memory(grey, tmp_path):
    d, _ = grey
    runs = {}
    for mode in ("never", "always"):
        cfg = tiny_config(
            data={"dataset": str(d / "x.npy"), "limit": 0, "binarize": "dynamic", "memory_map": mode},
            model={"likelihood": {"kind": "bernoulli"}},
            train={"epochs": 2, "batch_size": 32},
        )
        runs[mode] = pyrovae.fit(cfg, tmp_path / mode, progress=False, figures=False)
    a, b = (runs[m].model.state_dict() for m in ("never", "always"))
    for k in a:
        assert torch.equal(a[k], b[k]), k  # the same batches, the same binarization draws
    assert runs["always"].metrics["test_elbo"] == runs["never"].metrics["test_elbo"]


def test_bad_mapped_data_is_named(tmp_path):
    x = np.random.default_rng(0).random((40, 6), dtype=np.float32)
    (tmp_path / "s").mkdir()
    np.save(tmp_path / "s" / "a.npy", x[:20])
    np.savez_compressed(tmp_path / "s" / "b.npz", x=x[20:])
    with pytest.raises(DataError, match=r"b.npz: shard member 'x.npy' is compressed"):
        load_data(DataConfig(dataset=str(tmp_path / "s")))
    np.save(tmp_path / "s" / "b.npy", x[20:, :5])
    (tmp_path / "s" / "b.npz").unlink()
    with pytest.raises(DataError, match=r"b.npy: every shard must hold rows of one shape"):
        load_data(DataConfig(dataset=str(tmp_path / "s")))
    bad = x.copy()
    bad[33, 4] = np.inf
    np.save(tmp_path / "s" / "b.npy", bad[20:])
    with pytest.raises(DataError, match=r"found 1 NaN/inf value\(s\), the first at index \(33, 4\)"):
        load_data(DataConfig(dataset=str(tmp_path / "s")))
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(DataError, match="data.binarize='static' binarizes the training split"):
        load_data(DataConfig(dataset=str(tmp_path / "x.npy"), memory_map="always", binarize="static"))
    with pytest.raises(DataError, match="data.memory_map='always' needs a .npy file"):
        load_data(DataConfig(dataset="digits", memory_map="always"))


# ---------------------------------------------------------------------------------------------
# folders of images, read lazily
# ---------------------------------------------------------------------------------------------


def write_images(folder, n_per_class=(13, 9, 11), size=(6, 5), mode="L", seed=0):
    """Random-pixel PNGs, one subfolder per class (labels 0, 1, 2 in sorted order); returns the
    pixels of every file as `{path: (C, H, W) uint8}`."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for k, n in enumerate(n_per_class):
        for i in range(n):
            shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
            a = rng.integers(0, 256, shape, dtype=np.uint8)
            path = folder / f"class{k}" / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a, mode).save(path)
            pixels[path] = a[None] if mode == "L" else a.transpose(2, 0, 1)
    return pixels


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_lazy_image_folder_is_the_in_memory_data(tmp_path, mode):
    pixels = write_images(tmp_path / "imgs", mode=mode)
    cfg = {"dataset": str(tmp_path / "imgs"), "binarize": "dynamic"}
    mem = load_data(DataConfig(**cfg, memory_map="never"), seed=3)
    lazy = load_data(DataConfig(**cfg, memory_map="always"), seed=3)
    auto = load_data(DataConfig(**cfg), seed=3)  # small: in memory
    assert isinstance(lazy.x_train, MappedRows) and isinstance(lazy.x_train.array, ImageFiles)
    assert isinstance(mem.x_train, torch.Tensor) and isinstance(auto.x_train, torch.Tensor)
    assert lazy.shape == mem.shape == ((1 if mode == "L" else 3), 5, 6)
    # the same splits, labels and values bit for bit (val/test binarized with the same draws)
    assert fingerprint(lazy) == fingerprint(mem) == fingerprint(auto)
    idx = torch.tensor([7, 0, 20, 7])
    assert torch.equal(lazy.x_train.index_select(0, idx), mem.x_train.index_select(0, idx))
    assert torch.equal(lazy.x_train[3:11], mem.x_train[3:11])
    # and they are the files' pixels / 255, each row with its class label
    files = lazy.x_train.array.files
    for row, i in enumerate(lazy.x_train.index):
        assert torch.equal(mem.x_train[row], torch.from_numpy(pixels[files[i]].reshape(-1) / np.float32(255)))
        assert int(mem.y_train[row]) == int(files[i].parent.name.removeprefix("class"))
    g0, g1 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for a, b in zip(lazy.train_batches(8, g0), mem.train_batches(8, g1), strict=True):
        assert torch.equal(a, b)  # the same batches, the same binarization draws


def test_image_folder_is_read_lazily(tmp_path):
    write_images(tmp_path / "imgs")
    cfg = {"dataset": str(tmp_path / "imgs"), "binarize": "dynamic"}
    mem = load_data(DataConfig(**cfg, memory_map="never"), seed=0)
    lazy = load_data(DataConfig(**cfg, memory_map="always"), seed=0)
    files: ImageFiles = lazy.x_train.array
    n, n_train = len(files), len(lazy.x_train)
    # loading decoded each image once (the streaming check) and the held-out ones again
    assert files.decoded == n + (n - n_train)
    before = files.decoded
    lazy.x_train.index_select(0, torch.tensor([4, 1, 4]))
    assert files.decoded == before + 2  # only the rows asked for (a repeated one once)
    # the next read of a training row decodes the file as it is on disk now
    path = files.files[lazy.x_train.index[0]]
    old = lazy.x_train[0:1].clone()
    new = (255 - np.asarray(Image.open(path))).astype(np.uint8)
    Image.fromarray(new, "L").save(path)
    assert torch.equal(lazy.x_train[0:1], torch.from_numpy(new.reshape(1, -1) / np.float32(255)))
    assert not torch.equal(lazy.x_train[0:1], old)
    assert torch.equal(mem.x_train[0:1], old)  # in memory: decoded when loaded
    # a fresh load sees the change: only the training split's fingerprint differs
    again = load_data(DataConfig(**cfg, memory_map="always"), seed=0)
    changes = data_changes(fingerprint(mem), fingerprint(again))
    assert len(changes) == 1 and changes[0].startswith("x_train content (SHA-256")


def test_bad_images_in_a_lazy_folder_are_named(tmp_path):
    write_images(tmp_path / "a")
    png = tmp_path / "a" / "class1" / "0003.png"
    raw = png.read_bytes()
    png.write_bytes(raw[: raw.index(b"IDAT") + 12])  # a valid header, the pixels cut short
    files, _ = open_image_folder(tmp_path / "a")  # the header pass does not decode
    assert files.shape == (33, 1, 5, 6) and files.decoded == 0
    for memory_map in ("always", "never"):  # found by the one decoding pass, either way
        with pytest.raises(DataError) as e:
            load_data(DataConfig(dataset=str(tmp_path / "a"), memory_map=memory_map))
        assert str(e.value).startswith(f"{png}: cannot read image (OSError: image file is truncated")
        assert "\n" not in str(e.value)
    png.write_bytes(raw)
    odd = tmp_path / "a" / "class2" / "0005.png"
    Image.new("L", (6, 4)).save(odd)
    with pytest.raises(DataError, match=r"0005\.png: all images must have the same size and mode: "
                       r"expected 6x5 L \(as 0000\.png\), got 6x4 L$"):
        load_data(DataConfig(dataset=str(tmp_path / "a"), memory_map="always"))
    Image.new("L", (6, 5)).save(odd)
    ds = load_data(DataConfig(dataset=str(tmp_path / "a"), memory_map="always"))
    # a file replaced by one of another size after loading: the read that meets it says so
    Image.new("RGB", (6, 5)).save(ds.x_train.array.files[ds.x_train.index[2]])
    with pytest.raises(DataError, match=r"all images must have the same size and mode: "
                       r"expected 6x5 L .* got 6x5 RGB"):
        ds.x_train[0:5]


def test_fit_through_the_cli_from_a_lazy_image_folder(server, tmp_path):
    """`pyrovae fit` (a child process of the fork server in `conftest`, running exactly
    `pyrovae.cli.main(argv)`) on a folder of PNGs with the training split kept on disk trains the
    same parameters as in memory; resuming after an image changed is refused, naming the split."""
    write_images(tmp_path / "imgs", n_per_class=(40, 30, 26), size=(7, 6))
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(
        f'[data]\ndataset = "{tmp_path / "imgs"}"\nbinarize = "dynamic"\n'
        '[model]\nlatent_dim = 2\nencoder = { kind = "mlp", hidden = [16] }\n'
        'decoder = { kind = "mlp", hidden = [16] }\nlikelihood = { kind = "bernoulli" }\n'
        '[train]\nepochs = 3\nbatch_size = 16\nseed = 4\ndevice = "cpu"\n'
    )
    runs = {}
    for mode in ("never", "always"):
        res = server.run("fit", cfg, "--out", tmp_path / mode, "--set", f'data.memory_map="{mode}"', "--quiet")
        assert res.rc == 0, res.stderr
        runs[mode] = pyrovae.load_run(tmp_path / mode)
    a, b = (runs[m].model.state_dict() for m in ("never", "always"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert runs["always"].metrics["test_elbo"] == runs["never"].metrics["test_elbo"]
    curves = {m: [(h["train_elbo"], h["val_elbo"]) for h in runs[m].history] for m in runs}
    assert len(curves["always"]) == 3 and curves["always"] == curves["never"]
    Image.new("L", (7, 6), 9).save(tmp_path / "imgs" / "class0" / "0000.png")
    res = server.run("fit", "--out", tmp_path / "always", "--resume", "--set", "train.epochs=4", "--quiet")
    assert res.rc != 0
    assert "the data changed since the run" in res.stderr and "content (SHA-256" in res.stderr
