"""Fuzzing the config loader and the data loaders with hypothesis (issue 6).

Property everywhere: the loader returns a valid object, or raises our own error type
(:class:`~pyrovae.errors.ConfigError` / :class:`~pyrovae.errors.DataError`, both
:class:`~pyrovae.errors.PyroVAEError`) with a message — never any other exception.
Inputs are random values *and* valid files with random damage (flipped bytes, truncation,
appended junk), which reach much deeper into the parsers than random bytes alone.
"""

from __future__ import annotations

import io
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pyrovae import Config, ConfigError, DataError, PyroVAEError, load_config
from pyrovae.data import IDX_FILES, DataConfig, Dataset, load_data
from pyrovae.guides import GUIDES
from pyrovae.likelihoods import LIKELIHOODS
from pyrovae.networks import NETWORKS
from pyrovae.priors import PRIORS

FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# =============================================================================================
# config
# =============================================================================================
KEYS = [
    "data", "model", "train", "dataset", "root", "binarize", "val_fraction", "test_fraction",
    "limit", "kind", "latent_dim", "encoder", "decoder", "prior", "likelihood", "guide",
    "variant", "noise", "hidden", "activation", "channels", "components", "layers", "scale",
    "objective", "num_particles", "beta", "kl_warmup_epochs", "epochs", "batch_size", "lr",
    "seed", "device", "max_retries", "lr_backoff", "lr_decay", "lr_min",
    "validate_every_step", "fast_path",
]  # fmt: skip
WORDS = sorted(
    {k for r in (PRIORS, LIKELIHOODS, NETWORKS, GUIDES) for k in r.kinds()}
    | {
        "vae",
        "ae",
        "none",
        "static",
        "dynamic",
        "trace_elbo",
        "iwae",
        "mean_field",
        "trace_enum",
        "cpu",
    }
    | {"auto", "cuda", "learned", "softplus", "relu", "deep", "linear", "digits", "mnist"}
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=8))
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=300),
    st.floats(),  # includes nan, inf, -0.0, huge and tiny values
    st.text(max_size=12),
    st.sampled_from(WORDS),
)
trees = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=16,
)
sections = st.dictionaries(
    st.sampled_from(["data", "model", "train"]) | st.text(max_size=6), trees, max_size=3
)


def _check_config(make) -> Config | None:
    try:
        cfg = make()
    except ConfigError as e:
        assert str(e).strip()
        return None
    assert isinstance(cfg, Config)
    # whatever is accepted is finite and survives the TOML round trip pyrovae uses for runs
    assert load_config(tomllib.loads(tomli_w.dumps(cfg.to_dict()))) == cfg
    return cfg


@FUZZ
@given(raw=sections)
def test_config_from_random_nested_dicts(raw):
    _check_config(lambda: load_config(raw))


@FUZZ
@given(
    raw=st.fixed_dictionaries(
        {},
        optional={
            "data": st.dictionaries(st.sampled_from(KEYS[3:9]), scalars, max_size=3),
            "model": st.dictionaries(st.sampled_from(KEYS[9:23]), trees, max_size=3),
            "train": st.dictionaries(st.sampled_from(KEYS[23:]), scalars, max_size=4),
        },
    )
)
def test_config_from_near_valid_dicts(raw):
    """Known keys with random values: reaches the per-field validation of every section."""
    _check_config(lambda: load_config(raw))


toml_lines = st.one_of(
    st.sampled_from(["[data]", "[model]", "[train]", "[model.prior]", "[[train]]", "[", "]"]),
    st.builds(lambda k, v: f"{k} = {v}", st.sampled_from(KEYS), st.text(max_size=20)),
    st.builds(
        lambda k, v: f"{k} = {tomli_w.dumps({'v': v})[4:].strip()}",
        st.sampled_from(KEYS),
        trees.filter(lambda v: not isinstance(v, float) or math.isfinite(v)),
    ),
    st.text(max_size=30),
)


@FUZZ
@given(lines=st.lists(toml_lines, max_size=8), binary=st.binary(max_size=20))
def test_config_from_random_toml_files(work, lines, binary):
    path = work / "fuzz.toml"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    _check_config(lambda: load_config(path))
    path.write_bytes(binary)
    _check_config(lambda: load_config(path))


dotted = st.lists(st.sampled_from(KEYS) | st.text(max_size=5), min_size=0, max_size=4).map(".".join)
set_values = st.one_of(
    st.text(max_size=20),
    st.sampled_from(WORDS),
    trees.map(
        lambda v: tomli_w.dumps({"v": v})[4:].strip() if not isinstance(v, float) else repr(v)
    ),
    st.sampled_from(["[" * 2000, "{a=" * 800, '"unterminated', "1 2", "{kind=", "inf", "nan"]),
)
overrides = st.lists(
    st.one_of(st.builds(lambda k, v: f"{k}={v}", dotted, set_values), st.text(max_size=20)),
    max_size=4,
)


@FUZZ
@given(sets=overrides, base=st.sampled_from([None, "examples/configs/digits_vae.toml"]))
def test_config_from_random_set_overrides(sets, base):
    _check_config(lambda: load_config(base, sets))


def test_known_fuzz_findings():
    """Inputs fuzzing found that once escaped as other exceptions (kept as regressions)."""
    for sets in (
        ["train.lr=inf"],
        ["train.beta=1e999"],
        ["train.seed=4294967296"],
        ["v=" + "[" * 5000],
    ):
        with pytest.raises(ConfigError):
            load_config(None, sets)


# =============================================================================================
# data
# =============================================================================================
def test_known_data_fuzz_findings(work):
    """Big-endian arrays once crashed torch.from_numpy; float64 values beyond float32 once
    became inf silently."""
    np.save(work / "be.npy", np.arange(40, dtype=">f4").reshape(10, 4))
    ds = load_data(DataConfig(dataset=str(work / "be.npy")))
    assert ds.x_train.dtype == torch.float32 and ds.x_train.abs().sum() > 0
    np.save(work / "huge.npy", np.full((10, 4), 1e300))
    with pytest.raises(DataError, match=r"huge\.npy.*float32 range.*1e\+300"):
        load_data(DataConfig(dataset=str(work / "huge.npy")))


def _check_data(cfg: DataConfig) -> Dataset | None:
    try:
        ds = load_data(cfg)
    except DataError as e:
        assert str(e).strip()
        return None
    assert isinstance(ds, Dataset)
    d = math.prod(ds.shape)
    for x in (ds.x_train, ds.x_val, ds.x_test):
        assert x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] == d
        assert bool(torch.isfinite(x).all())
    assert ds.x_train.shape[0] >= 1
    return ds


def _mutate(raw: bytes, data) -> bytes:
    """Random damage to a valid file: flipped bytes, then maybe truncation or junk appended."""
    out = bytearray(raw)
    n = data.draw(st.integers(0, 6), label="flips")
    for _ in range(n):
        i = data.draw(st.integers(0, len(out) - 1), label="at")
        out[i] = data.draw(st.integers(0, 255), label="byte")
    how = data.draw(st.sampled_from(["keep", "truncate", "append"]), label="how")
    if how == "truncate":
        out = out[: data.draw(st.integers(0, len(out)), label="length")]
    elif how == "append":
        out += data.draw(st.binary(min_size=1, max_size=16), label="junk")
    return bytes(out)


dtypes = st.sampled_from(
    ["<f4", ">f4", "<f8", ">f8", "<f2", "u1", "i1", "<i2", ">i4", "<u8", "?", "<c8", "<M8[s]", "O"]
)
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple)


def _array(dtype: str, shape: tuple, data) -> np.ndarray:
    if dtype == "O":
        return np.array([None, {"a": 1}], dtype=object)
    base = data.draw(
        st.lists(st.floats(-1e40, 1e40) | st.just(float("nan")), min_size=1, max_size=4),
        label="values",
    )
    with np.errstate(all="ignore"):
        vals = np.resize(np.asarray(base), shape or ()).astype(np.float64)
        if dtype.startswith("<M8"):
            return np.zeros(shape, dtype=dtype)
        integer = np.dtype(dtype).kind in "iub"
        return np.nan_to_num(vals).astype(dtype) if integer else vals.astype(dtype)


@FUZZ
@given(data=st.data(), dtype=dtypes, shape=shapes, binarize=st.sampled_from(["none", "static"]))
def test_npy_files(work, data, dtype, shape, binarize):
    arr = _array(dtype, shape, data)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    raw = (
        buf.getvalue()
        if data.draw(st.booleans(), label="intact")
        else _mutate(buf.getvalue(), data)
    )
    path = work / "fuzz.npy"
    path.write_bytes(raw)
    _check_data(DataConfig(dataset=str(path), binarize=binarize))


@FUZZ
@given(data=st.data(), dtype=dtypes, shape=shapes, labels=st.booleans())
def test_npz_files(work, data, dtype, shape, labels):
    arr = _array(dtype, shape, data)
    buf = io.BytesIO()
    extra = {"y": np.arange(arr.shape[0] if arr.ndim else 1) % 3} if labels else {}
    key = data.draw(st.sampled_from(["x", "x", "data"]), label="key")
    np.savez(buf, allow_pickle=True, **{key: arr}, **extra)
    raw = (
        buf.getvalue()
        if data.draw(st.booleans(), label="intact")
        else _mutate(buf.getvalue(), data)
    )
    path = work / "fuzz.npz"
    path.write_bytes(raw)
    _check_data(DataConfig(dataset=str(path)))


@FUZZ
@given(raw=st.binary(max_size=200), suffix=st.sampled_from([".npy", ".npz"]))
def test_random_bytes_as_array_files(work, raw, suffix):
    path = work / f"random{suffix}"
    path.write_bytes(b"\x93NUMPY" + raw if suffix == ".npy" and raw[:1] == b"\x01" else raw)
    _check_data(DataConfig(dataset=str(path)))


def _idx(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


@FUZZ
@given(data=st.data(), which=st.sampled_from(IDX_FILES), gz=st.booleans())
def test_idx_folders(work, data, which, gz):
    import gzip
    import shutil

    root = work / "idx"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"train": (6, 3, 3), "t10k": (3, 3, 3)}
    for stem in IDX_FILES:
        split, what = stem.split("-")[:2]
        shape = sizes[split] if what == "images" else sizes[split][:1]
        raw = _idx(rng.integers(0, 10 if what == "labels" else 256, shape))
        if stem == which:
            raw = _mutate(raw, data)
        (root / (stem + (".gz" if gz else ""))).write_bytes(gzip.compress(raw) if gz else raw)
    ds = _check_data(DataConfig(dataset="mnist", root=str(root), val_fraction=0.2))
    if ds is not None:
        assert ds.shape[0] == 1 and len(ds.shape) == 3


def _png(size: tuple[int, int], mode: str, value: int) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, value if mode == "L" else (value, 0, 255 - value)).save(buf, "PNG")
    return buf.getvalue()


@FUZZ
@given(
    data=st.data(),
    mode=st.sampled_from(["L", "RGB"]),
    size=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    fmt=st.sampled_from([".png", ".png", ".bmp", ".gif", ".jpg"]),
)
def test_image_folders(work, data, mode, size, fmt):
    import shutil

    folder = work / "images"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for i in range(5):
        raw = _png(size, mode, 40 * i)
        if i == 2:
            raw = _mutate(raw, data) if data.draw(st.booleans(), label="damage") else raw
        (folder / f"img{i}{fmt if i == 2 else '.png'}").write_bytes(raw)
    _check_data(DataConfig(dataset=str(folder)))


@FUZZ
@given(raw=st.binary(max_size=300))
def test_random_bytes_as_image(work, raw):
    import shutil

    folder = work / "random-images"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / "a.png").write_bytes(_png((3, 3), "L", 0))
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + raw if raw[:1] == b"\x00" else raw)
    (folder / "c.png").write_bytes(_png((3, 3), "L", 9))
    _check_data(DataConfig(dataset=str(folder)))


class _Touch:
    """Unpickling this calls ``open(marker, "w")``, which creates the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_pickled_arrays_are_refused_not_executed(work, suffix):
    """Object arrays are pickles: refused (``allow_pickle=False``), never unpickled."""
    marker = work / "pwned"
    arr = np.array([_Touch(marker), None], dtype=object)
    path = work / f"pickled{suffix}"
    np.save(path, arr, allow_pickle=True) if suffix == ".npy" else np.savez(path, x=arr)
    with pytest.raises(PyroVAEError, match=f"pickled\\{suffix}"):
        load_data(DataConfig(dataset=str(path)))
    assert not marker.exists()
