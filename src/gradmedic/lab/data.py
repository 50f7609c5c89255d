"""Data for the lab: scikit-learn's digits by default, real MNIST from IDX files on request.

Both come standardized (each feature to zero mean and unit variance on the
training split) as float32 tensors with integer labels.
"""

from __future__ import annotations

import functools
import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gradmedic.errors import GradmedicError

MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class Dataset:
    """A classification data set split into train and test.

    Attributes:
        name: ``"digits"`` or ``"mnist"``.
        x_train: ``(n, features)`` float32, standardized.
        y_train: ``(n,)`` int64 labels.
        x_test: ``(m, features)`` float32, standardized with the training statistics.
        y_test: ``(m,)`` int64 labels.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def n_features(self) -> int:
        """Input size."""
        return int(self.x_train.shape[1])

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    def subset(self, n_train: int, n_test: int | None = None) -> Dataset:
        """The first ``n_train`` training and ``n_test`` test examples (for quick runs)."""
        n_test = n_train if n_test is None else n_test
        return Dataset(
            self.name,
            self.x_train[:n_train],
            self.y_train[:n_train],
            self.x_test[:n_test],
            self.y_test[:n_test],
        )


def digits(seed: int = 0, test_fraction: float = 0.25) -> Dataset:
    """scikit-learn's digits (8x8 images, 10 classes, 1797 examples), split by ``seed``.

    Args:
        seed: Seed of the shuffled, stratified train/test split.
        test_fraction: Share of examples held out for testing.

    Returns:
        The standardized data set (64 features), cached: do not modify its tensors
        in place.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    return _digits(seed, test_fraction)


@functools.lru_cache(maxsize=4)
def _digits(seed: int, test_fraction: float) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return _standardized("digits", x_tr, y_tr, x_te, y_te)


def mnist(folder: str | Path) -> Dataset:
    """Real MNIST from the four IDX files in ``folder`` (optionally gzipped).

    Expects ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each possibly
    with ``.gz``), as distributed by LeCun et al. Images are flattened to 784
    features.

    The data set is cached per folder: do not modify its tensors in place.

    Raises:
        GradmedicError: The folder or a file is missing, or a file is not valid IDX.
    """
    return _mnist(str(Path(folder).resolve()))


@functools.lru_cache(maxsize=2)
def _mnist(folder_name: str) -> Dataset:
    folder = Path(folder_name)
    if not folder.is_dir():
        raise GradmedicError(
            f"--mnist {folder}: not a folder; give the folder holding the IDX files"
        )
    arrays = {key: _read_idx(_find(folder, stem)) for key, stem in MNIST_FILES.items()}
    for split in ("train", "test"):
        n_x, n_y = len(arrays[f"x_{split}"]), len(arrays[f"y_{split}"])
        if n_x != n_y:
            raise GradmedicError(
                f"MNIST {split} split in {folder}: {n_x} images but {n_y} labels; "
                "the image and label files do not belong together"
            )
    flat = {k: v.reshape(len(v), -1) if k.startswith("x") else v for k, v in arrays.items()}
    return _standardized("mnist", flat["x_train"], flat["y_train"], flat["x_test"], flat["y_test"])


def load(seed: int = 0, mnist_dir: str | Path | None = None) -> Dataset:
    """MNIST from ``mnist_dir`` when given, else digits split by ``seed``."""
    return digits(seed) if mnist_dir is None else mnist(mnist_dir)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    raise GradmedicError(
        f"MNIST file {stem}[.gz] not found in {folder}; it needs "
        + ", ".join(f"{s}[.gz]" for s in MNIST_FILES.values())
    )


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file: magic (0, 0, dtype code, ndim), big-endian dims, then the data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise GradmedicError(f"cannot read MNIST file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise GradmedicError(
            f"{path} is not an unsigned-byte IDX file (bad magic number); "
            "download the original MNIST files"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise GradmedicError(f"{path} is truncated (header cut short)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise GradmedicError(
            f"{path} holds {len(raw) - header} bytes of data, expected {expected} for shape {dims}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _standardized(
    name: str, x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray
) -> Dataset:
    x_tr = np.asarray(x_tr, dtype=np.float64)
    x_te = np.asarray(x_te, dtype=np.float64)
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std[std == 0] = 1.0  # constant pixels (image borders) stay 0 instead of dividing by 0
    return Dataset(
        name,
        torch.from_numpy((x_tr - mean) / std).float(),
        torch.from_numpy(np.asarray(y_tr, dtype=np.int64)),
        torch.from_numpy((x_te - mean) / std).float(),
        torch.from_numpy(np.asarray(y_te, dtype=np.int64)),
    )
