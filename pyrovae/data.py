"""Datasets as in-memory tensors: built-in image sets, IDX files, arrays and image folders.

`load_data` turns a `DataConfig` into a `Dataset` holding flattened float32
train / validation / test tensors (and labels where the source has them). Sources:

* `digits`: scikit-learn's 1,797 real 8x8 digits (shipped with scikit-learn, no download);
* `mnist` / `fashion-mnist` / `kmnist`: the four standard IDX files, read from
  `data.root` (gzipped or not, directly there or in a `raw/` subfolder), or downloaded by
  torchvision into `~/.cache/pyrovae/<name>` when `data.root` is empty;
* a `.npy` file, a `.npz` file (key `x`, optional `y`) or a folder of images;
* a folder of `.npy` / uncompressed `.npz` shards (concatenated in file-name order).

Larger than memory: a `.npy` file or a folder of shards is memory-mapped (read-only, random
access advised to the kernel), never read whole; a folder of images is read lazily
(`ImageFiles`: the headers are checked when it is opened, the pixels decoded only where it is
indexed). The value checks and the likelihood's support checks stream over it once, in chunks
(every image decoded once); the splits are the same seeded index sets as for an in-memory
array; when the training split is large (`data.memory_map`) it stays on disk as a
`MappedRows`, from which the trainer gathers each minibatch by index (the validation and test
splits are read into memory).

Every problem caused by the user's data or configuration raises `DataError`
naming the file or config field, the expected and the actual value.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from pyrovae.errors import DataError

__all__ = [
    "DataConfig",
    "Dataset",
    "ImageFiles",
    "MappedRows",
    "data_changes",
    "fingerprint",
    "labelled_subset",
    "load_data",
    "open_image_folder",
    "read_idx",
]

BUILTIN_DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "kmnist")
"""Built-in dataset names accepted by `data.dataset`."""

_TORCHVISION_CLASSES: dict[str, str] = {
    "mnist": "MNIST",
    "fashion-mnist": "FashionMNIST",
    "kmnist": "KMNIST",
}
"""torchvision class for each IDX dataset."""

IDX_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
"""The four standard IDX files (without the optional `.gz`)."""
_IDX_IMAGES_MAGIC = 0x00000803  # 2051: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # 2049: unsigned bytes, 1 dimension

_IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
"""IDX type code -> big-endian numpy dtype."""

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
ARRAY_EXTENSIONS: tuple[str, ...] = (".npy", ".npz")

# Offsets mixed into `seed` so that splitting and each split's binarization use independent,
# reproducible random streams (changing `limit` does not change how the test set is binarized).
_SPLIT_STREAM = 0
_BINARIZE_STREAMS = {"train": 1, "val": 2, "test": 3}
_LABELS_STREAM = 4


class DataConfig(BaseModel):
    """The `[data]` section of a run configuration."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(
        "digits",
        min_length=1,
        description="digits | mnist | fashion-mnist | kmnist | a path to .npy / .npz / a folder of images",
    )
    root: str = Field(
        "",
        description="local folder holding the four standard IDX files (gzipped or not); "
        "'' = download via torchvision into ~/.cache/pyrovae (only works online)",
    )
    binarize: Literal["none", "static", "dynamic"] = "none"
    val_fraction: float = Field(
        0.1, ge=0.0, lt=0.5, description="share of the training pool held out for validation"
    )
    test_fraction: float = Field(
        0.2,
        gt=0.0,
        lt=0.5,
        description="share held out for test when the dataset has no official test split",
    )
    memory_map: Literal["auto", "always", "never"] = Field(
        "auto",
        description="keep the training split of a .npy file, a folder of shards or a folder of "
        "images on disk and gather (decode) each minibatch from it: auto = when it exceeds "
        "1 GiB as float32",
    )
    limit: int = Field(
        0,
        ge=0,
        description="if > 0, keep only the first `limit` shuffled training points "
        "(and max(limit // 4, 1) validation / test points)",
    )
    labels: int | None = Field(
        None,
        ge=0,
        description="semi-supervised training: keep the labels of a class-balanced, seeded subset "
        "of this many training points and mark the others unlabelled (label -1); unset = every "
        "training label is kept",
    )
    codes_from: str = Field(
        "",
        description="a run folder of a trained VAE (kind = 'vae', Gaussian guide): every point is "
        "replaced by its code under that run's q(z|x), and the model trains on the codes (M1+M2 of "
        "Kingma et al. 2014: M2 on the codes of the VAE M1); '' = the points themselves",
    )
    codes: Literal["sample", "mean"] = Field(
        "sample",
        description="with codes_from: 'sample' draws every training code afresh from q(z|x) each "
        "time its minibatch is drawn (validation and test: the posterior means); 'mean': the "
        "posterior means everywhere",
    )


#: `data.memory_map = "auto"` maps a training split larger than this (float32 bytes)
MAP_ABOVE_BYTES = 1 << 30
_CHUNK_BYTES = 1 << 26  # rows read at a time by the streaming passes (64 MiB)
_RELEASE_BYTES = 1 << 26  # minibatch bytes gathered between releases of the mapped pages


def release_pages(array) -> None:
    """Drop this process's mapping of the pages of a memory-mapped array (or of every shard)
    that were read so far (`madvise(MADV_DONTNEED)` on a read-only file mapping: the data stay
    in the OS page cache, but no longer count in the resident set). No-op for other arrays
    (`ImageFiles` keeps nothing: each read decodes into a fresh array)."""
    import mmap

    if isinstance(array, _Shards):
        for a in array.arrays:
            release_pages(a)
        return
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    if base is not None and hasattr(mmap, "MADV_DONTNEED"):
        base.madvise(mmap.MADV_DONTNEED)


class MappedRows:
    """Rows `index` of an `(N, ...)` array on disk (a memory-mapped `.npy` file or shards, or
    the `ImageFiles` of a folder), as a float32 `(len(index), D)` matrix that is read only
    where it is indexed.

    It has what the trainer and the checks use of a tensor: `shape`, `len`, `dtype`,
    `index_select(0, idx)` and `[i:j]` (both return tensors, divided by `scale` when the source
    is 8-bit images), `to(device)` (rows are gathered on the CPU and moved per batch) and
    `chunks()`, consecutive row blocks for streaming passes.
    """

    def __init__(self, array, index: np.ndarray, scale: float | None, device="cpu") -> None:
        self.array, self.index, self.scale = array, np.asarray(index, dtype=np.int64), scale
        self.dim = math.prod(array.shape[1:])
        self.device = torch.device(device)
        self.dtype = torch.float32
        self._touched = 0  # bytes gathered since the mapped pages were last released

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.index), self.dim))

    def __len__(self) -> int:
        return len(self.index)

    def _rows(self, rows: np.ndarray) -> torch.Tensor:
        order = np.argsort(rows, kind="stable")  # ascending offsets: sequential-ish reads
        got = np.empty((len(rows), self.dim), dtype=np.float32)
        got[order] = np.asarray(self.array[rows[order]], dtype=np.float32).reshape(
            len(rows), self.dim
        )
        # each scattered row maps a few pages (the kernel maps up to 64 KiB around a fault)
        self._touched += len(rows) * max(got.nbytes // max(len(rows), 1), 1 << 16)
        if self._touched > _RELEASE_BYTES:  # unmap what was read (it stays in the page cache)
            release_pages(self.array)
            self._touched = 0
        t = torch.from_numpy(got)
        if self.scale is not None:
            t = t / self.scale
        return t.to(self.device, non_blocking=True) if self.device.type != "cpu" else t

    def index_select(self, dim: int, idx: torch.Tensor) -> torch.Tensor:
        if dim != 0:
            raise ValueError("MappedRows.index_select: only rows (dim 0)")
        return self._rows(self.index[idx.cpu().numpy()])

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, slice):
            return self._rows(self.index[key])
        if isinstance(key, torch.Tensor):
            return self.index_select(0, key.reshape(-1))
        raise TypeError(f"MappedRows: index with a slice or a tensor of rows, got {type(key)}")

    def to(self, device) -> MappedRows:
        return MappedRows(self.array, self.index, self.scale, device)

    def chunks(self, rows: int | None = None) -> Iterator[torch.Tensor]:
        """The rows in order, `rows` at a time (default: about 64 MiB)."""
        rows = rows or max(1, _CHUNK_BYTES // (4 * max(self.dim, 1)))
        for start in range(0, len(self), rows):
            yield self[start : start + rows]

    def split(self, rows: int) -> Iterator[torch.Tensor]:
        return self.chunks(rows)


def row_chunks(x) -> Iterator[torch.Tensor]:
    """`x` (a tensor or `MappedRows`) as blocks of rows: the tensor itself, or the mapped
    rows read a chunk at a time."""
    if isinstance(x, MappedRows):
        yield from x.chunks()
    else:
        yield x


@dataclass
class Dataset:
    """Train / validation / test tensors of one dataset, all in memory.

    `x_*` are float32, flattened to `(N, D)` with `D = prod(shape)`, and contiguous;
    `y_*` are int64 labels of length `N` or `None`. `x_train` may be a `MappedRows` (a
    training split on disk, see `DataConfig.memory_map`).
    """

    name: str
    shape: tuple[int, ...]
    x_train: torch.Tensor
    x_val: torch.Tensor
    x_test: torch.Tensor
    y_train: torch.Tensor | None
    y_val: torch.Tensor | None
    y_test: torch.Tensor | None
    binarize: str
    #: `data.codes = "sample"`: the posterior scales of the training codes; each minibatch is then
    #: drawn afresh as `x_train + x_train_scale * eps`, `eps ~ N(0, I)` (see `encode_with_run`)
    x_train_scale: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        """Number of values in one datapoint, `prod(shape)`."""
        return math.prod(self.shape)

    def to(self, device: torch.device | str) -> Dataset:
        """Return a copy with every tensor moved to `device`."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            x_train=self.x_train.to(device),
            x_val=self.x_val.to(device),
            x_test=self.x_test.to(device),
            y_train=move(self.y_train),
            y_val=move(self.y_val),
            y_test=move(self.y_test),
            x_train_scale=move(self.x_train_scale),
        )

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """One epoch of shuffled minibatches of `x_train`.

        A single `torch.randperm` drawn with `generator` orders the epoch; batches are index
        slices of it (the last, smaller batch is kept), so every training point appears exactly
        once. With `binarize == "dynamic"` each batch is resampled as
        `torch.bernoulli(batch, generator=generator)`: a fresh binarization every time a batch
        is drawn. For speed, pass a generator on the same device as the data.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        n = self.x_train.shape[0]
        device = self.x_train.device
        perm = torch.randperm(n, generator=generator, device=generator.device).to(device)
        for start in range(0, n, batch_size):
            batch = self.x_train[perm[start : start + batch_size]]
            if self.binarize == "dynamic":
                batch = bernoulli(batch, generator)
            yield batch


def bernoulli(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`torch.bernoulli(probs, generator=generator)`: the same draws, faster on CPU, and with a
    generator on another device too.

    On CPU, $u < p$ with `u = torch.rand(...)` consumes the same uniforms in the same
    order as `torch.bernoulli`, so it gives the same values **bit for bit** and leaves the
    generator in the same state (`tests/test_data.py` checks both), and is faster: 0.40 against
    0.47 ms for a 128×784 MNIST batch, 0.54 against 1.28 ms when the probabilities are spread over
    (0, 1). On CUDA, `torch.bernoulli` itself.
    """
    if generator.device == probs.device and probs.device.type != "cpu":
        return torch.bernoulli(probs, generator=generator)
    u = torch.rand(probs.shape, generator=generator, device=generator.device, dtype=probs.dtype)
    return (u.to(probs.device) < probs).to(probs.dtype)


# ---------------------------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    """Read a file, transparently gunzipping it (detected by the gzip magic bytes)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror or e})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt gzip file ({type(e).__name__}: {e})") from None
    if path.suffix == ".gz":
        raise DataError(
            f"{path}: corrupt gzip file (expected the gzip magic bytes 1f 8b, got {raw[:2].hex(' ') or 'an empty file'})"
        )
    return raw


def _parse_idx(data: bytes, path: Path, expected_magic: int | None = None) -> np.ndarray:
    """Parse the bytes of an IDX file, validating magic number, type code, dims and length."""
    if len(data) < 4:
        raise DataError(
            f"{path}: truncated IDX file: expected at least a 4-byte header, got {len(data)} bytes"
        )
    magic = int.from_bytes(data[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise DataError(
            f"{path}: bad IDX magic number: expected {expected_magic} (0x{expected_magic:08x}), "
            f"got {magic} (0x{magic:08x})"
        )
    code, ndim = data[2], data[3]
    if data[0] != 0 or data[1] != 0 or code not in _IDX_DTYPES or ndim == 0:
        codes = ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES)
        raise DataError(
            f"{path}: bad IDX magic number: expected 0x0000TTNN with type code TT in {{{codes}}} "
            f"(0x08 = unsigned bytes) and NN >= 1 dimensions, got 0x{magic:08x}"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{path}: truncated IDX file: expected a {header}-byte header for {ndim} dimensions, "
            f"got {len(data)} bytes"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "too long"
        raise DataError(
            f"{path}: {kind} IDX file: expected {expected} bytes ({header}-byte header + "
            f"{'x'.join(map(str, dims))} values of {dtype.itemsize} byte(s)), got {len(data)} bytes"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))  # native byte order, writable copy


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped or plain) into a numpy array of its dimensions.

    Validates the magic number (two zero bytes, a known type code, at least one dimension) and
    that the byte length matches the header exactly. Raises `DataError` naming the file.
    """
    p = Path(path)
    return _parse_idx(_read_bytes(p), p)


def _find_idx_folder(root: Path, tv_class: str) -> Path | None:
    """Return the first of `root`, `root/raw`, `root/<tv_class>/raw` holding IDX files."""
    for folder in (root, root / "raw", root / tv_class / "raw"):
        if folder.is_dir() and any(
            (folder / f).is_file() or (folder / f"{f}.gz").is_file() for f in IDX_FILES
        ):
            return folder
    return None


def _idx_file(folder: Path, stem: str) -> Path:
    """Path of `stem` or `stem.gz` in `folder` (the plain file preferred)."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    found = sorted(p.name for p in folder.iterdir())
    raise DataError(
        f"{folder}: missing IDX file {stem}[.gz]; expected the four files "
        f"{', '.join(IDX_FILES)} (each optionally .gz), found {found or 'nothing'}"
    )


def _load_idx_folder(
    root: Path, name: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read and cross-check the four standard IDX files under `root`."""
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(
            f"data.root: expected a folder holding the four IDX files {', '.join(IDX_FILES)}; "
            f"'{root}' {what}"
        )
    folder = _find_idx_folder(root, _TORCHVISION_CLASSES[name])
    if folder is None:
        found = sorted(p.name for p in root.iterdir())
        raise DataError(
            f"data.root='{root}': no IDX files found there or in raw/; expected "
            f"{', '.join(IDX_FILES)} (each optionally .gz), found {found or 'nothing'}"
        )
    paths = [_idx_file(folder, stem) for stem in IDX_FILES]  # all missing-file errors first
    arrays = []
    for path, magic in zip(paths, (_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC) * 2, strict=True):
        arrays.append(_parse_idx(_read_bytes(path), path, expected_magic=magic))
    x_tr, y_tr, x_te, y_te = arrays
    for (xp, x), (yp, y) in (
        ((paths[0], x_tr), (paths[1], y_tr)),
        ((paths[2], x_te), (paths[3], y_te)),
    ):
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"{xp.name} holds {x.shape[0]} images but {yp.name} holds {y.shape[0]} labels "
                f"(in {folder}): expected the same count"
            )
        if x.shape[0] == 0:
            raise DataError(f"{xp}: expected at least one image, got 0")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(
            f"{paths[2]}: expected images of size {x_tr.shape[1]}x{x_tr.shape[2]} like "
            f"{paths[0].name}, got {x_te.shape[1]}x{x_te.shape[2]}"
        )
    return x_tr, y_tr, x_te, y_te


def _cache_dir() -> Path:
    """Where torchvision downloads go: `~/.cache/pyrovae`."""
    return Path.home() / ".cache" / "pyrovae"


def _download_idx(name: str) -> Path:
    """Download `name` with torchvision (unless cached) and return its root folder."""
    root = _cache_dir() / name
    tv_class = _TORCHVISION_CLASSES[name]
    folder = _find_idx_folder(root, tv_class)
    if folder is not None and all(
        (folder / f).is_file() or (folder / f"{f}.gz").is_file() for f in IDX_FILES
    ):
        return root
    try:
        import torchvision.datasets as tvd

        getattr(tvd, tv_class)(root=str(root), train=True, download=True)
    except Exception as e:  # any download failure: network, mirror, checksum, disk
        raise DataError(
            f"data.dataset='{name}': downloading via torchvision into {root} failed "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
            f"offline? Set data.root to a local folder holding the four IDX files "
            f"{', '.join(IDX_FILES)} (each optionally .gz)"
        ) from None
    return root


# ---------------------------------------------------------------------------------------------
# Arrays and image folders
# ---------------------------------------------------------------------------------------------


def _check_numeric(arr: np.ndarray, what: str) -> None:
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{what}: expected a numeric array, got dtype {arr.dtype}")


def _load_npy(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror or e})") from None
    if magic != b"\x93NUMPY":
        raise DataError(
            f"{path}: not a .npy file: expected the magic bytes \\x93NUMPY, got {magic!r}"
        )
    try:
        x = _map_npy(path)
    except Exception as e:  # corrupt header, pickled objects, I/O errors
        raise DataError(f"{path}: cannot read .npy file ({type(e).__name__}: {e})") from None
    if not isinstance(x, np.ndarray):
        raise DataError(f"{path}: expected a .npy array, got {type(x).__name__}")
    _check_numeric(x, str(path))
    return x, None


def _map_at(path: Path, offset: int) -> np.ndarray:
    """The `.npy` array whose header starts at byte `offset` of `path`, memory-mapped
    read-only (`mmap`, with `MADV_RANDOM`: minibatches read scattered rows, so no read-ahead)."""
    import mmap

    with open(path, "rb") as f:
        f.seek(offset)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        start = f.tell()
        if dtype.hasobject:
            raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
        nbytes = math.prod(shape) * dtype.itemsize
        size = os.fstat(f.fileno()).st_size
        if start + nbytes > size:
            raise ValueError(
                f"truncated: the header describes {nbytes} data bytes, the file holds "
                f"{size - start}"
            )
        if nbytes == 0:
            return np.empty(shape, dtype=dtype)
        mm = mmap.mmap(f.fileno(), start + nbytes, access=mmap.ACCESS_READ)
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mm.madvise(mmap.MADV_RANDOM)
    return np.ndarray(shape, dtype=dtype, buffer=mm, offset=start, order="F" if fortran else "C")


def _map_npy(path: Path) -> np.ndarray:
    return _map_at(path, 0)


def _map_npz_member(path: Path, member: str) -> np.ndarray:
    """Member `member` of an uncompressed `.npz` (`np.savez`), memory-mapped in place."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED:
        raise DataError(
            f"{path}: shard member {member!r} is compressed, so it cannot be memory-mapped; "
            "expected np.savez (not np.savez_compressed) or a .npy file"
        )
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return _map_at(path, info.header_offset + 30 + name_len + extra_len)


class _Shards:
    """Several `(N_i, ...)` arrays of one dtype and row shape as one `(sum N_i, ...)` array
    (read-only: integer-array and slice row indexing, what the splits and checks use)."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays])
        self.shape = (int(self.starts[-1]), *arrays[0].shape[1:])
        self.dtype, self.ndim = arrays[0].dtype, arrays[0].ndim
        self.size = math.prod(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            key = np.arange(*key.indices(self.shape[0]))
        rows = np.asarray(key, dtype=np.int64)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for k in np.unique(which):
            sel = which == k
            out[sel] = self.arrays[k][rows[sel] - self.starts[k]]
        return out


def _load_shards(folder: Path, files: list[Path]) -> tuple[_Shards, np.ndarray | None]:
    """A folder of `.npy` / uncompressed `.npz` shards (key `x`, optional `y`), mapped."""
    arrays, labels = [], []
    for f in files:
        if f.suffix.lower() == ".npy":
            x, y = _load_npy(f)
        else:
            try:
                with np.load(f, allow_pickle=False) as npz:
                    keys = list(npz.keys())
                    y = npz["y"] if "y" in keys else None
            except Exception as e:
                raise DataError(f"{f}: cannot read .npz file ({type(e).__name__}: {e})") from None
            if "x" not in keys:
                raise DataError(f"{f}: expected an array under key 'x', found keys {keys}")
            try:
                x = _map_npz_member(f, "x.npy")
            except DataError:
                raise
            except Exception as e:
                raise DataError(f"{f}: cannot map key 'x' ({type(e).__name__}: {e})") from None
            _check_numeric(x, f"{f} (key 'x')")
        if x.ndim == 0:
            raise DataError(f"{f}: expected an array of shape (N, ...), got a scalar")
        if arrays and (x.shape[1:] != arrays[0].shape[1:] or x.dtype != arrays[0].dtype):
            raise DataError(
                f"{f}: every shard must hold rows of one shape and dtype: expected "
                f"{arrays[0].shape[1:]} {arrays[0].dtype} (as {files[0].name}), got "
                f"{x.shape[1:]} {x.dtype}"
            )
        arrays.append(x)
        labels.append(y)
    if any(y is None for y in labels) and not all(y is None for y in labels):
        raise DataError(f"{folder}: labels 'y' in some shards but not in others; expected all or none")
    y_all = None if labels[0] is None else np.concatenate([np.asarray(y) for y in labels])
    return _Shards(arrays), y_all


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.keys())
            if "x" not in keys:
                raise DataError(
                    f"{path}: expected an array under key 'x' (and optional labels under 'y'), "
                    f"found keys {keys}"
                )
            x = npz["x"]
            y = npz["y"] if "y" in keys else None
    except DataError:
        raise
    except Exception as e:  # bad zip, corrupt member, pickled objects
        raise DataError(f"{path}: cannot read .npz file ({type(e).__name__}: {e})") from None
    _check_numeric(x, f"{path} (key 'x')")
    if y is not None:
        _check_numeric(y, f"{path} (key 'y')")
        if y.ndim != 1 or x.ndim == 0 or y.shape[0] != x.shape[0]:
            raise DataError(
                f"{path}: expected labels 'y' of shape ({x.shape[0] if x.ndim else '?'},) "
                f"matching 'x', got shape {y.shape}"
            )
        if y.dtype.kind == "f":
            bad = ~np.isfinite(y) | (y != np.round(y))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise DataError(
                    f"{path}: expected integer labels 'y', got {float(y[i])} at index {i}"
                )
    return x, y


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


_IMAGE_MODES = {"1": "L", "L": "L", "P": "RGB", "RGB": "RGB"}
"""PIL mode of an image file -> the mode it is read as (greyscale or 8-bit RGB)."""


class ImageFiles:
    """The images of a folder as one read-only `(N, C, H, W)` uint8 array that decodes only the
    files it is indexed with (PIL), every time it is indexed: nothing is cached.

    It has what the splits, the streaming checks and `MappedRows` use of an array: `shape`,
    `dtype`, `ndim`, `size`, `len` and row indexing with a slice, an integer or an integer array
    (a file asked for twice in one index is decoded once). `files[i]` is row `i`; every image must
    have the size `(W, H) = (shape[3], shape[2])` and read as `mode` ("L": C = 1, "RGB": C = 3),
    which `open_image_folder` checked from the headers; a file that fails to decode, or that no
    longer matches, raises the one-line `DataError` naming it. `decoded` counts the images decoded
    so far (each file read is one).
    """

    def __init__(self, files: list[Path], mode: str, size: tuple[int, int]) -> None:
        self.files, self.mode = list(files), mode
        channels = 1 if mode == "L" else 3
        self.shape = (len(self.files), channels, int(size[1]), int(size[0]))
        self.dtype, self.ndim = np.dtype(np.uint8), 4
        self.size = math.prod(self.shape)
        self.decoded = 0

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self[np.array([key])][0]
        if isinstance(key, slice):
            key = np.arange(*key.indices(self.shape[0]))
        rows = np.asarray(key, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < -self.shape[0] or rows.max() >= self.shape[0]):
            raise IndexError(f"ImageFiles: rows out of range for {self.shape[0]} images")
        distinct, where = np.unique(rows % max(self.shape[0], 1), return_inverse=True)
        images = np.empty((len(distinct), *self.shape[1:]), dtype=np.uint8)
        for k, i in enumerate(distinct.tolist()):
            images[k] = self._decode(self.files[i])
        where = where.reshape(-1)
        if len(distinct) == len(rows) and bool((where == np.arange(len(rows))).all()):
            return images  # ascending distinct rows (a slice): already in order
        return images[where]

    def _decode(self, path: Path) -> np.ndarray:
        """One image as `(C, H, W)` uint8: the pixels PIL decodes, converted to `mode`."""
        pixels, mode, size = _read_image(path, decode=True)
        expected = (self.shape[3], self.shape[2])
        if size != expected or mode != self.mode:
            raise DataError(
                f"{path}: all images must have the same size and mode: expected "
                f"{expected[0]}x{expected[1]} {self.mode} (as {self.files[0].name}), got "
                f"{size[0]}x{size[1]} {mode}"
            )
        self.decoded += 1
        assert pixels is not None
        return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _read_image(path: Path, decode: bool) -> tuple[np.ndarray | None, str, tuple[int, int]]:
    """`(pixels, mode, (W, H))` of an image file; with `decode=False` only its header is read
    (`pixels` is None). `DataError` naming the file if it cannot be read or its mode is not
    greyscale or RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            mode = _IMAGE_MODES.get(img.mode)
            if mode is None:
                raise DataError(
                    f"{path}: unsupported image mode {img.mode!r}; expected greyscale (L) or "
                    f"RGB (8 bits per channel, no alpha)"
                )
            if not decode:
                return None, mode, img.size
            img.load()
            if img.mode != mode:
                img = img.convert(mode)
            return np.asarray(img, dtype=np.uint8), mode, img.size
    except DataError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def open_image_folder(folder: str | Path) -> tuple[ImageFiles, np.ndarray | None]:
    """A folder of images (flat, or one subfolder per class: labels are the sorted subfolder
    indices) as a lazy `ImageFiles` and its labels (or None).

    Reads only the header of every file (size and mode: one pass, no pixels decoded), so any
    file PIL cannot identify, of another mode than greyscale / RGB, or of another size or mode
    than the first is a `DataError` naming it; a file whose pixels fail to decode is found when
    it is first read (`load_data` decodes every image once, in its streaming check).
    """
    folder = Path(folder)
    files = _image_files(folder)
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    labels: list[int] | None = None
    if files:
        if any(_image_files(d) for d in subdirs):
            raise DataError(
                f"{folder}: expected either images directly in the folder or one subfolder per "
                f"class, got both ({files[0].name} and subfolders)"
            )
    else:
        class_dirs = subdirs
        labels = []
        for k, d in enumerate(class_dirs):
            imgs = _image_files(d)
            if not imgs:
                raise DataError(
                    f"{d}: expected class subfolder to contain images "
                    f"({'/'.join(IMAGE_EXTENSIONS)}), found none"
                )
            files.extend(imgs)
            labels.extend([k] * len(imgs))
        if not files:
            hint = ""
            if any((folder / f).exists() or (folder / f"{f}.gz").exists() for f in IDX_FILES):
                hint = "; it holds IDX files: set data.dataset to mnist/fashion-mnist/kmnist and data.root to this folder"
            raise DataError(
                f"{folder}: expected images ({'/'.join(IMAGE_EXTENSIONS)}) or class subfolders "
                f"of images, found none{hint}"
            )

    _, ref_mode, ref_size = _read_image(files[0], decode=False)
    for f in files[1:]:  # the header pass
        _, mode, size = _read_image(f, decode=False)
        if size != ref_size or mode != ref_mode:
            raise DataError(
                f"{f}: all images must have the same size and mode: expected "
                f"{ref_size[0]}x{ref_size[1]} {ref_mode} (as {files[0].name}), got "
                f"{size[0]}x{size[1]} {mode}"
            )
    y = None if labels is None else np.asarray(labels, dtype=np.int64)
    return ImageFiles(files, ref_mode, ref_size), y


# ---------------------------------------------------------------------------------------------
# Splitting, checks, binarization
# ---------------------------------------------------------------------------------------------


def _point_shape(arr_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one datapoint of an `(N, ...)` array: 3-D `(N, H, W)` gets a channel axis."""
    rest = tuple(int(s) for s in arr_shape[1:])
    if len(rest) == 0:
        return (1,)
    if len(rest) == 2:
        return (1, *rest)
    return rest


def _scan(x) -> dict[str, object]:
    """One streaming pass over the rows of `x` (an array, memory-mapped or not, or shards),
    a chunk of about 64 MiB at a time: the count and first index of NaN/inf values, min, max
    and max |x| of the finite ones."""
    n = x.shape[0]
    row_bytes = max(1, math.prod(x.shape[1:]) * x.dtype.itemsize)
    rows = max(1, _CHUNK_BYTES // row_bytes)
    out: dict[str, object] = {"bad": 0, "first": None, "lo": math.inf, "hi": -math.inf, "abs": 0.0}
    for start in range(0, n, rows):
        c = np.asarray(x[start : start + rows])
        if c.dtype.kind == "f":
            bad = ~np.isfinite(c)
            k = int(bad.sum())
            if k:
                if out["first"] is None:
                    i = np.unravel_index(int(np.argmax(bad.ravel())), c.shape)
                    out["first"] = (start + int(i[0]), *(int(j) for j in i[1:]))
                out["bad"] = int(out["bad"]) + k
        if c.size and not out["bad"]:
            lo, hi = float(c.min()), float(c.max())
            out["lo"], out["hi"] = min(out["lo"], lo), max(out["hi"], hi)
            out["abs"] = max(float(out["abs"]), abs(lo), abs(hi))
        release_pages(x)  # a mapped file: the pages read leave the resident set again
    return out


def _check_values(x: np.ndarray, what: str, stats: dict | None = None) -> None:
    """Reject NaN / inf values (naming the count and the first offending index) and values
    that would overflow to inf as float32 (from `_scan`'s one pass)."""
    if x.dtype.kind != "f":
        return
    stats = stats or _scan(x)
    if stats["bad"]:
        first = stats["first"]
        raise DataError(
            f"{what}: expected finite values, found {stats['bad']} NaN/inf value(s), the first at "
            f"index {first if len(first) > 1 else first[0]}"
        )
    limit = float(np.finfo(np.float32).max)
    if x.dtype.itemsize > 4 and x.size and float(stats["abs"]) > limit:
        raise DataError(
            f"{what}: expected values within the float32 range (|x| <= {limit:.4g}), found "
            f"{float(stats['abs']):.4g}"
        )


def _check_unit_range(x: np.ndarray, what: str, binarize: str, stats: dict | None = None) -> None:
    stats = stats or _scan(x)
    lo, hi = float(stats["lo"]), float(stats["hi"])
    if lo < 0.0 or hi > 1.0:
        raise DataError(
            f"data.binarize='{binarize}' needs values in [0, 1] (Bernoulli probabilities) but "
            f"{what} has min {lo:g} and max {hi:g}; rescale the data or set data.binarize='none'"
        )


def _n_holdout(n: int, fraction: float) -> int:
    """Size of a held-out split: `round(n * fraction)`, at least 1 when `fraction > 0`."""
    return 0 if fraction <= 0 else max(1, int(round(n * fraction)))


def _derive_seed(seed: int, stream: int) -> int:
    return (int(seed) * 1_000_003 + stream * 7_919 + 12_345) % (2**63 - 1)


def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(_derive_seed(seed, stream))


def _to_float(x: np.ndarray, idx: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Rows `idx` of `x` as a contiguous float32 `(len(idx), D)` tensor (from a mapped array:
    1,024 rows at a time, the mapped pages released after each block)."""
    # numpy converts any numeric dtype (big-endian, float128, uint64, bool) to float32 first
    d, ix = math.prod(x.shape[1:]), idx.numpy()
    rows = np.empty((len(ix), d), dtype=np.float32)
    for start in range(0, len(ix), 1024):
        rows[start : start + 1024] = np.asarray(x[ix[start : start + 1024]], dtype=np.float32).reshape(-1, d)
        release_pages(x)
    t = torch.from_numpy(rows).reshape(len(idx), d)
    if scale is not None:
        t = t / scale
    return t.contiguous()


def _labels(y: np.ndarray | None, idx: torch.Tensor) -> torch.Tensor | None:
    if y is None:
        return None
    return torch.from_numpy(np.asarray(y)[idx.numpy()].astype(np.int64)).contiguous()


def _split(
    n: int, cfg: DataConfig, seed: int, official_test: bool, name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded train / val / test index tensors for `n` points (test empty if official)."""
    perm = torch.randperm(n, generator=_generator(seed, _SPLIT_STREAM))
    n_test = 0 if official_test else _n_holdout(n, cfg.test_fraction)
    n_val = _n_holdout(n - n_test, cfg.val_fraction)
    test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    if len(train) == 0:
        raise DataError(
            f"{name}: {n} datapoint(s) leave an empty training split after holding out "
            f"{n_test} for test (data.test_fraction={cfg.test_fraction}) and {n_val} for "
            f"validation (data.val_fraction={cfg.val_fraction}); expected more data"
        )
    if cfg.limit > 0:
        k = max(cfg.limit // 4, 1)
        train, val, test = train[: cfg.limit], val[:k], test[:k]
    return train, val, test


def _binarize(ds: Dataset, seed: int) -> Dataset:
    """Apply the binarization protocol (see `load_data`)."""
    if ds.binarize == "none":
        return ds
    g = {k: _generator(seed, s) for k, s in _BINARIZE_STREAMS.items()}
    x_val = torch.bernoulli(ds.x_val, generator=g["val"])
    x_test = torch.bernoulli(ds.x_test, generator=g["test"])
    x_train = ds.x_train
    if ds.binarize == "static":
        x_train = torch.bernoulli(x_train, generator=g["train"])
    return replace(ds, x_train=x_train, x_val=x_val, x_test=x_test)


def _resolve(dataset: str) -> tuple[str, Path | None]:
    """Map `data.dataset` to `(builtin name, None)` or `(kind, path)`."""
    key = dataset.strip().lower()
    if key in BUILTIN_DATASETS:
        return key, None
    path = Path(dataset).expanduser()
    if not path.exists():
        raise DataError(
            f"data.dataset: expected one of {', '.join(BUILTIN_DATASETS)} or an existing "
            f".npy / .npz file or image folder, got '{dataset}' (no such file or folder)"
        )
    if path.is_dir():
        return "folder", path
    suffix = path.suffix.lower()
    if suffix not in ARRAY_EXTENSIONS:
        raise DataError(
            f"data.dataset='{dataset}': unsupported file extension '{path.suffix}'; expected "
            f".npy, .npz or a folder of images ({'/'.join(IMAGE_EXTENSIONS)})"
        )
    return suffix[1:], path


@dataclass
class _Source:
    """Raw arrays of one dataset before splitting (`x_test` only for official test sets)."""

    name: str
    where: str  # how error messages refer to it: the dataset name or the file / folder path
    shape: tuple[int, ...]
    x: np.ndarray
    y: np.ndarray | None
    scale: float | None  # divide by this to reach [0, 1]; None = use values as they are
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    mappable: bool = False  # x is on disk (mapped or image files): the training split may stay there


def _read_source(name: str, path: Path | None, cfg: DataConfig) -> _Source:
    """Read the raw arrays of a built-in dataset, an array file or an image folder."""
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = bunch.data.reshape(-1, 1, 8, 8)
        return _Source("digits", "digits", (1, 8, 8), x, bunch.target, 16.0)
    if path is None:  # mnist-like
        root = Path(cfg.root).expanduser() if cfg.root else _download_idx(name)
        x, y, x_te, y_te = _load_idx_folder(root, name)
        shape = (1, int(x.shape[1]), int(x.shape[2]))
        return _Source(name, name, shape, x, y, 255.0, x_te, y_te)
    if name == "folder":
        shards = sorted(
            p for p in path.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in ARRAY_EXTENSIONS
        )
        if shards and not _image_files(path):
            x, y = _load_shards(path, shards)
            return _Source(path.name, str(path), _point_shape(x.shape), x, y, None, mappable=True)
        images, y = open_image_folder(path)
        return _Source(
            path.name or str(path), str(path), images.shape[1:], images, y, 255.0, mappable=True
        )
    else:
        x, y = _load_npy(path) if name == "npy" else _load_npz(path)
        if x.ndim == 0:
            raise DataError(f"{path}: expected an array of shape (N, ...), got a scalar")
    mappable = name == "npy" and x.size > 0
    return _Source(path.name or str(path), str(path), _point_shape(x.shape), x, y, None, mappable=mappable)


def load_data(cfg: DataConfig, seed: int = 0) -> Dataset:
    """Load the dataset described by `cfg` and split it reproducibly.

    * Splits: `digits`, arrays and image folders hold out a seeded `test_fraction` for test,
      then `val_fraction` of the rest for validation; MNIST-like sets keep their official test
      set and hold out `val_fraction` of the 60,000 training images. Same `cfg` and `seed`
      give identical tensors.
    * `limit > 0` keeps the first `limit` shuffled training points and
      `max(limit // 4, 1)` validation / test points.
    * Binarization: `static` binarizes train, val and test once; `dynamic` keeps `x_train`
      grey-level (resampled per batch by `Dataset.train_batches`) and binarizes val and
      test once. Both use generators seeded from `seed` (one independent stream per split).
    """
    name, path = _resolve(cfg.dataset)
    if cfg.root and name not in _TORCHVISION_CLASSES:
        raise DataError(
            f"data.root is only used with {', '.join(_TORCHVISION_CLASSES)}; expected '' for "
            f"data.dataset='{cfg.dataset}', got '{cfg.root}'"
        )
    src = _read_source(name, path, cfg)
    x, y = src.x, src.y
    if x.shape[0] == 0 or math.prod(src.shape) == 0:
        raise DataError(
            f"{src.where}: expected at least one non-empty datapoint, got an array of shape {x.shape}"
        )
    official_test = src.x_test is not None
    train_idx, val_idx, test_idx = _split(x.shape[0], cfg, seed, official_test, src.where)
    big = len(train_idx) * math.prod(src.shape) * 4 > MAP_ABOVE_BYTES
    mapped = src.mappable and (cfg.memory_map == "always" or (cfg.memory_map == "auto" and big))
    if cfg.memory_map == "always" and not src.mappable:
        raise DataError(
            f"data.memory_map='always' needs a .npy file, a folder of .npy/.npz shards or a "
            f"folder of images; got data.dataset='{cfg.dataset}'"
        )
    if mapped and cfg.binarize == "static":
        raise DataError(
            f"data.binarize='static' binarizes the training split once, in memory, but "
            f"{src.where}'s training split stays on disk (data.memory_map='{cfg.memory_map}'); "
            "use data.binarize='dynamic' or data.memory_map='never'"
        )
    if isinstance(x, ImageFiles) and not mapped:
        x = x[:]  # in memory: every image decoded once, into one (N, C, H, W) uint8 array
    stats = _scan(x)  # the one streaming pass over the values (image files: each decoded once)
    _check_values(x, src.where, stats)
    if cfg.binarize != "none" and src.scale is None:
        _check_unit_range(x, src.where, cfg.binarize, stats)

    if src.x_test is not None:
        test_idx = torch.arange(src.x_test.shape[0])
        if cfg.limit > 0:
            test_idx = test_idx[: max(cfg.limit // 4, 1)]
        x_test = _to_float(src.x_test, test_idx, src.scale)
        y_test = _labels(src.y_test, test_idx)
    else:
        x_test, y_test = _to_float(x, test_idx, src.scale), _labels(y, test_idx)

    ds = Dataset(
        name=src.name,
        shape=src.shape,
        x_train=(
            MappedRows(x, train_idx.numpy(), src.scale)
            if mapped
            else _to_float(x, train_idx, src.scale)
        ),
        x_val=_to_float(x, val_idx, src.scale),
        x_test=x_test,
        y_train=_labels(y, train_idx),
        y_val=_labels(y, val_idx),
        y_test=y_test,
        binarize=cfg.binarize,
    )
    if cfg.labels is not None:
        ds = replace(ds, y_train=labelled_subset(ds.y_train, cfg.labels, seed, src.where))
    if cfg.codes_from:
        return encode_with_run(ds, cfg.codes_from, cfg.codes, cfg.binarize)
    return _binarize(ds, seed)


def encode_with_run(ds: Dataset, run_dir: str, codes: str = "sample", binarize: str = "none") -> Dataset:
    r"""`ds` with every point $x$ replaced by its code under the trained VAE in `run_dir`
    (`data.codes_from`): M1 of Kingma et al.'s M1+M2 ("Semi-Supervised Learning with Deep
    Generative Models", 2014), whose M2 then models the codes instead of the pixels.

    The VAE's guide is Gaussian, $q(z \mid x) = \mathcal N(\mu_\phi(x), \mathrm{diag}\,
    \sigma_\phi^2(x))$. Validation and test points become $\mu_\phi(x)$. Training points
    become $\mu_\phi(x)$ too, and with `codes = "sample"` (the paper's protocol) the dataset
    also keeps $\sigma_\phi(x)$ (`x_train_scale`), so that the trainer draws every minibatch
    afresh, $z = \mu + \sigma \odot \varepsilon$, as dynamic binarization redraws pixels.
    The images are encoded as they are loaded (grey levels: the probabilities a binarized VAE
    saw on average), so `binarize` must be `"none"`. Labels and splits are unchanged.
    """
    from pyrovae.errors import PyroVAEError
    from pyrovae.runs import load_run

    if binarize != "none":
        raise DataError(
            f"data.binarize: expected 'none' with data.codes_from (the codes are real-valued; the "
            f"images are encoded as grey levels), got '{binarize}'"
        )
    try:
        run = load_run(run_dir)
    except PyroVAEError as e:
        raise DataError(f"data.codes_from: cannot load the run '{run_dir}': {e}") from None
    model = run.model.cpu().eval()
    kind = run.config.model.kind
    guide = getattr(getattr(run.config.model, "guide", None), "kind", None)
    if kind != "vae" or guide != "normal":
        raise DataError(
            f"data.codes_from: expected a run of kind = 'vae' with the Gaussian guide "
            f"(guide.kind = 'normal'), got kind = '{kind}'"
            + (f", guide.kind = '{guide}'" if guide else "")
            + f" in '{run_dir}'"
        )
    if tuple(model.data_shape) != tuple(ds.shape):
        raise DataError(
            f"data.codes_from: the run '{run_dir}' was trained on points of shape "
            f"{tuple(model.data_shape)}; this dataset's points have shape {tuple(ds.shape)}"
        )

    @torch.no_grad()
    def encode(x) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [model.posterior.encode(b) for c in row_chunks(x) for b in c.split(4096)] or [
            (torch.zeros(0, model.latent_dim),) * 2
        ]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    loc, scale = encode(ds.x_train)
    return replace(
        ds,
        name=f"{ds.name} codes ({run_dir})",
        shape=(model.latent_dim,),
        x_train=loc,
        x_val=encode(ds.x_val)[0],
        x_test=encode(ds.x_test)[0],
        binarize="none",
        x_train_scale=scale if codes == "sample" else None,
    )


def labelled_subset(y: torch.Tensor | None, n: int, seed: int, where: str) -> torch.Tensor:
    """`y` with all but a class-balanced, seeded subset of `n` labels set to -1 (unlabelled).

    Each of the $C$ classes present keeps $\\lfloor n / C \\rfloor$ labels, and $n \\bmod C$
    classes (chosen at random) one more: the protocol of semi-supervised MNIST benchmarks
    (Kingma et al. 2014: 100 labels = 10 per class). The points are drawn with a generator
    seeded from `seed` (its own stream), so the same config gives the same labelled points.
    `DataError` if the data have no labels, or `n` exceeds the training split or a class.
    """
    if y is None:
        raise DataError(
            f"data.labels = {n}: {where} has no labels (expected a dataset with labels, e.g. "
            "mnist, digits, an .npz with 'y' or a folder of class sub-folders)"
        )
    if n > y.numel():
        raise DataError(
            f"data.labels = {n}: expected at most the {y.numel()} points of the training split"
        )
    g = _generator(seed, _LABELS_STREAM)
    classes, counts = torch.unique(y, return_counts=True)
    quota = torch.full((len(classes),), n // len(classes), dtype=torch.int64)
    quota[torch.randperm(len(classes), generator=g)[: n % len(classes)]] += 1
    keep = torch.zeros_like(y, dtype=torch.bool)
    for c, q in zip(classes.tolist(), quota.tolist(), strict=True):
        idx = (y == c).nonzero().flatten()
        if q > len(idx):
            raise DataError(
                f"data.labels = {n}: a class-balanced subset needs {q} points of class {c}, but "
                f"the training split has {len(idx)}; expected data.labels <= "
                f"{len(classes) * int(counts.min())}"
            )
        keep[idx[torch.randperm(len(idx), generator=g)[:q]]] = True
    return torch.where(keep, y, torch.full_like(y, -1)).contiguous()


# ---------------------------------------------------------------------------------------------
# Fingerprints: has the data changed since a run was trained?
# ---------------------------------------------------------------------------------------------
SPLITS: tuple[str, ...] = ("x_train", "x_val", "x_test", "y_train", "y_val", "y_test")
"""The tensors of a `Dataset` that its fingerprint covers."""

_HASH_CHUNK = 1 << 24  # bytes hashed at a time: the hash never needs a second copy of the data


def _tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (C order), hashed in chunks of 16 MiB (a `MappedRows`:
    the same bytes, read a chunk at a time)."""
    if isinstance(t, MappedRows):
        h = hashlib.sha256()
        for c in t.chunks():
            h.update(memoryview(c.contiguous().numpy()).cast("B"))
        return h.hexdigest()
    flat = t.detach().cpu().contiguous().reshape(-1)
    h = hashlib.sha256()
    per_chunk = max(_HASH_CHUNK // max(flat.element_size(), 1), 1)
    for start in range(0, flat.numel(), per_chunk):
        h.update(memoryview(flat[start : start + per_chunk].numpy()).cast("B"))
    return h.hexdigest()


def fingerprint(ds: Dataset) -> dict[str, dict[str, object]]:
    """Shape, dtype and SHA-256 of every split of `ds`, as loaded (after splitting and
    binarization, so deterministic for a config and seed).

    Returns `{split: {"shape": [...], "dtype": "float32", "sha256": "..."}}` for the splits in
    `SPLITS` that exist (labels are absent for unlabelled data). Plain data: it is stored in
    run checkpoints and compared by `data_changes`.
    """
    out: dict[str, dict[str, object]] = {}
    for name in SPLITS:
        t = getattr(ds, name)
        if t is None:
            continue
        out[name] = {
            "shape": [int(s) for s in t.shape],
            "dtype": str(t.dtype).removeprefix("torch."),
            "sha256": _tensor_sha256(t),
        }
    return out


def data_changes(then: dict, now: dict) -> list[str]:
    """What differs between two `fingerprint`s, one phrase per split (empty if nothing).

    E.g. `"x_train content (SHA-256 3f2a9c01b7e4 then, 9d0c11e2a5f3 now)"` or
    `"x_val shape ([40, 4] then, [41, 4] now)"`; a split present in only one of them is
    reported as added or removed.
    """
    changes = []
    for name in [*SPLITS, *(k for k in then if k not in SPLITS)]:
        a, b = then.get(name), now.get(name)
        if a is None and b is None:
            continue
        if a is None or b is None:
            changes.append(f"{name} {'added' if a is None else 'removed'}")
        elif list(a.get("shape", [])) != list(b["shape"]):
            changes.append(f"{name} shape ({list(a.get('shape', []))} then, {b['shape']} now)")
        elif a.get("dtype") != b["dtype"]:
            changes.append(f"{name} dtype ({a.get('dtype')} then, {b['dtype']} now)")
        elif a.get("sha256") != b["sha256"]:
            changes.append(
                f"{name} content (SHA-256 {str(a.get('sha256'))[:12]} then, "
                f"{str(b['sha256'])[:12]} now)"
            )
    return changes
