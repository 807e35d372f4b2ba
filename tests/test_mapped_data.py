"""Data larger than memory: `.npy` files and folders of shards memory-mapped, the training
split gathered per minibatch from disk (`pyrovae.data.MappedRows`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config

import pyrovae
from pyrovae.data import DataConfig, MappedRows, fingerprint, load_data
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
