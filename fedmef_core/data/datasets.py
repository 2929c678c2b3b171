"""Load an image dataset once per process into uint8 tensors: `load_dataset(cfg) -> (train, test)`.

Each dataset is an entry of `fedmef_core.registry.DATASETS` naming its loader here (shape, classes, statistics
beside it). The loaders, by dataset:

- ``fashion_mnist``: the Debian package ``dataset-fashion-mnist`` (gzipped IDX files in
  ``/usr/share/datasets/fashion-mnist/``, or ``$FEDMEF_FASHION_MNIST_DIR``), else torchvision under
  ``cfg.root`` (first without, then with download).
- ``mnist``, ``cifar10``, ``cifar100``: torchvision under ``cfg.root`` (first without, then with download).
- ``cinic10``, ``tinyimagenet``: a folder the user places under ``cfg.root`` (layouts in their entries).

Every failure to find the data raises :class:`DatasetUnavailable` naming each way to get it.
"""

from __future__ import annotations

import functools
import gzip
import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from fedmef_core.config import DataConfig
from fedmef_core.errors import UserError
from fedmef_core.registry import DATASETS, FASHION_MNIST_ENV, Dataset

FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

class DatasetUnavailable(UserError, RuntimeError):
    """The dataset is not on disk and could not be fetched; the message lists every way to get it."""


@dataclass(frozen=True, eq=False)
class ImageData:
    """A whole split in memory. Treat the tensors as read-only: they are shared through the cache."""

    images: torch.Tensor  # uint8, N x C x H x W, contiguous
    labels: torch.Tensor  # int64, N
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, [0, 1] units
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or not self.images.is_contiguous():
            raise ValueError("images must be a contiguous uint8 tensor N x C x H x W")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must be an int64 tensor with one label per image")
        channels = self.images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean and std need {channels} values (one per channel)")
        if len(self.class_names) != self.num_classes:
            raise ValueError("class_names must have num_classes entries")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, image size, classes), as :func:`image_shape` gives them from the config."""
        return int(self.images.shape[1]), int(self.images.shape[-1]), self.num_classes


def load_dataset(cfg: DataConfig) -> tuple[ImageData, ImageData]:
    """(train, test) for `cfg`, decoded once per process and cached."""
    root = str(Path(cfg.root).expanduser().resolve())
    env = tuple(os.environ.get(name) for name in DATASETS[cfg.name].env)  # where its loader looks, too
    with _LOCK:  # concurrent first calls decode once
        return _prepared(cfg.name, root, env, cfg.cifar_shape, cfg.train_limit, cfg.test_limit)


_LOCK = threading.Lock()


@functools.lru_cache(maxsize=8)
def _prepared(name, root, env, cifar_shape, train_limit, test_limit) -> tuple[ImageData, ImageData]:
    train, test = _decoded(name, root, env)
    train, test = _first(train, train_limit), _first(test, test_limit)
    if cifar_shape:
        train, test = _to_cifar_shape(train), _to_cifar_shape(test)
    return train, test


@functools.lru_cache(maxsize=4)
def _decoded(name: str, root: str, env: tuple[str | None, ...]) -> tuple[ImageData, ImageData]:
    entry = DATASETS[name]  # `env`: the values of its `env` variables, read by its loader (part of the cache key)
    return entry.load()(entry, root)


def _first(data: ImageData, limit: int | None) -> ImageData:
    if limit is None or limit >= len(data):
        return data
    return _replace(data, data.images[:limit].clone(), data.labels[:limit].clone())


def image_shape(cfg: DataConfig) -> tuple[int, int, int]:
    """(channels, image size, classes) the model sees for `cfg`, known without loading the data."""
    entry = DATASETS[cfg.name]
    channels, size, classes = entry.channels, entry.size, entry.classes
    return (3, 32, classes) if cfg.cifar_shape and (channels, size) == (1, 28) else (channels, size, classes)


def _to_cifar_shape(data: ImageData) -> ImageData:
    """Pad 28x28 to 32x32 (2 px of zeros each side) and repeat one channel to three; else unchanged."""
    if data.images.shape[1:] != (1, 28, 28):
        return data
    images = F.pad(data.images, [2], fill=0).repeat(1, 3, 1, 1).contiguous()
    return ImageData(images, data.labels, data.num_classes, data.class_names, data.mean * 3, data.std * 3)


def _replace(data: ImageData, images: torch.Tensor, labels: torch.Tensor) -> ImageData:
    return ImageData(images, labels, data.num_classes, data.class_names, data.mean, data.std)


# --- Fashion-MNIST: Debian IDX files, then torchvision ----------------------------------------------

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def fashion_mnist(entry: Dataset, root: str) -> tuple[ImageData, ImageData]:
    debian_dir = Path(os.environ.get(FASHION_MNIST_ENV, FASHION_MNIST_DEBIAN_DIR))
    if all((debian_dir / f).is_file() for pair in _IDX_FILES.values() for f in pair):
        splits = [_read_idx_split(debian_dir, *_IDX_FILES[s]) for s in ("train", "test")]
        mean, std = entry.stats
        return tuple(ImageData(x, y, 10, FASHION_MNIST_CLASSES, mean, std) for x, y in splits)  # type: ignore[return-value]
    try:
        return from_torchvision(entry, root)
    except DatasetUnavailable as exc:
        raise DatasetUnavailable(
            f"Fashion-MNIST not found. Tried {debian_dir} (no IDX files) and torchvision under {root}. "
            "Get it in one of these ways:\n"
            "  1. sudo apt-get install dataset-fashion-mnist  (offline, Debian/Ubuntu; files land in "
            f"{FASHION_MNIST_DEBIAN_DIR}, or point ${FASHION_MNIST_ENV} at a folder holding "
            f"{', '.join(f for pair in _IDX_FILES.values() for f in pair)})\n"
            f"  2. place the raw files under {root}/FashionMNIST/raw/ (torchvision's layout)\n"
            "  3. run once with network access so torchvision can download them into data.root\n"
            f"(torchvision: {exc})"
        ) from exc


def _read_idx_split(folder: Path, images_file: str, labels_file: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(folder / images_file, expect_ndim=3)
    labels = read_idx(folder / labels_file, expect_ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise DatasetUnavailable(
            f"{folder}: {images_file} has {images.shape[0]} images but {labels_file} has {labels.shape[0]} "
            f"labels; {CORRUPT_FIX}"
        )
    if labels.size and labels.max() >= 10:
        raise DatasetUnavailable(f"{folder / labels_file}: label {labels.max()} out of range 0..9; {CORRUPT_FIX}")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


CORRUPT_FIX = (
    "the file is corrupt (truncated or overwritten): reinstall it (`sudo apt-get install --reinstall "
    f"dataset-fashion-mnist`) or point ${FASHION_MNIST_ENV} at a folder holding intact copies"
)


def read_idx(path: Path, expect_ndim: int) -> np.ndarray:
    """Parse a (gzipped) unsigned-byte IDX file, checking its magic number and size.

    Every way the file can be damaged (bad gzip stream, truncation, wrong header or size) raises
    :class:`DatasetUnavailable` naming the file and the fix.
    """
    raw = _read_maybe_gzipped(path)
    header = 4 + 4 * expect_ndim
    if len(raw) < header or raw[:2] != b"\0\0" or raw[2] != 0x08 or raw[3] != expect_ndim:
        magic = raw[:4].hex() if len(raw) >= 4 else "nothing"
        raise DatasetUnavailable(
            f"{path}: not an unsigned-byte IDX file with {expect_ndim} dims "
            f"(magic 0x{magic}, expected 0x000008{expect_ndim:02x}); {CORRUPT_FIX}"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=expect_ndim, offset=4))
    if len(raw) - header != int(np.prod(dims)):
        raise DatasetUnavailable(
            f"{path}: header says {dims} ({np.prod(dims)} bytes), found {len(raw) - header}; {CORRUPT_FIX}"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _read_maybe_gzipped(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:  # truncated; not gzip or bad CRC; bad deflate data
        raise DatasetUnavailable(
            f"{path}: cannot be decompressed ({type(exc).__name__}: {exc}); {CORRUPT_FIX}"
        ) from None


# --- torchvision datasets -----------------------------------------------------------------------------


def from_torchvision(entry: Dataset, root: str) -> tuple[ImageData, ImageData]:
    """The torchvision dataset `entry.torchvision` (a class of `torchvision.datasets`) under `root`."""
    from torchvision import datasets as tvd

    cls = getattr(tvd, entry.torchvision)
    mean, std = entry.stats
    out = []
    for train in (True, False):
        ds = _open_torchvision(cls, root, train)
        images = torch.as_tensor(np.asarray(ds.data), dtype=torch.uint8)
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # to N x C x H x W
        labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
        classes = tuple(str(c) for c in ds.classes)
        out.append(ImageData(images.contiguous(), labels, len(classes), classes, mean, std))
    return out[0], out[1]


def _open_torchvision(cls, root: str, train: bool):
    try:
        return cls(root, train=train, download=False)
    except RuntimeError:
        pass
    try:
        return cls(root, train=train, download=True)
    except Exception as exc:
        raise DatasetUnavailable(
            f"{cls.__name__} is not under {root} and could not be downloaded ({type(exc).__name__}: {exc}). "
            f"Run once with network access (torchvision downloads it into data.root = {root}), or copy "
            f"torchvision's on-disk layout of {cls.__name__} there from a machine that has it."
        ) from exc


# --- user folders: CINIC-10, Tiny ImageNet ---------------------------------------------------------------

Files = list[tuple[Path, int]]


def _unavailable(name: str, root: Path, problem: str) -> DatasetUnavailable:
    layout = DATASETS[name].layout.replace("<root>", str(root))
    return DatasetUnavailable(f"{name}: {problem}. Expected layout: {layout}")


def _class_dirs(name: str, root: Path, split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise _unavailable(name, root, f"missing folder {split_dir}")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise _unavailable(name, root, f"no class folders in {split_dir}")
    return classes


def cinic10(entry: Dataset, root: str) -> tuple[ImageData, ImageData]:
    return _from_folder("cinic10", *_cinic10_files(Path(root)))


def tinyimagenet(entry: Dataset, root: str) -> tuple[ImageData, ImageData]:
    return _from_folder("tinyimagenet", *_tinyimagenet_files(Path(root)))


def _cinic10_files(root: Path) -> tuple[tuple[str, ...], Files, Files]:
    base = root / "cinic10"
    classes = _class_dirs("cinic10", root, base / "train")
    splits = []
    for split in ("train", "test"):
        if _class_dirs("cinic10", root, base / split) != classes:
            raise _unavailable(
                "cinic10", root, f"{base / split} and {base / 'train'} have different class folders"
            )
        files = [(p, i) for i, c in enumerate(classes) for p in sorted((base / split / c).glob("*.png"))]
        if not files:
            raise _unavailable("cinic10", root, f"no .png files under {base / split}")
        splits.append(files)
    return tuple(classes), splits[0], splits[1]


def _tinyimagenet_files(root: Path) -> tuple[tuple[str, ...], Files, Files]:
    base = root / "tiny-imagenet-200"
    classes = _class_dirs("tinyimagenet", root, base / "train")
    index = {wnid: i for i, wnid in enumerate(classes)}
    train = [
        (p, i) for i, c in enumerate(classes) for p in sorted((base / "train" / c / "images").glob("*.JPEG"))
    ]
    if not train:
        raise _unavailable("tinyimagenet", root, f"no .JPEG files under {base / 'train'}/<wnid>/images")
    notes = base / "val" / "val_annotations.txt"
    if not notes.is_file():
        raise _unavailable("tinyimagenet", root, f"missing {notes}")
    test = []
    for n, line in enumerate(notes.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise _unavailable(
                "tinyimagenet", root, f"{notes}:{n}: expected '<file>\\t<wnid>\\t...' with a known wnid"
            )
        path = base / "val" / "images" / fields[0]
        if not path.is_file():
            raise _unavailable("tinyimagenet", root, f"{notes}:{n} names {path}, which does not exist")
        test.append((path, index[fields[1]]))
    if not test:
        raise _unavailable("tinyimagenet", root, f"{notes} lists no images")
    return tuple(classes), train, test


def _from_folder(
    name: str, classes: tuple[str, ...], train: Files, test: Files
) -> tuple[ImageData, ImageData]:
    tensors = [_decode_images(name, files) for files in (train, test)]
    if tensors[0][0].shape[1:] != tensors[1][0].shape[1:]:
        raise DatasetUnavailable(f"{name}: train and test images differ in size")
    mean, std = channel_stats(tensors[0][0])
    return tuple(ImageData(x, y, len(classes), classes, mean, std) for x, y in tensors)  # type: ignore[return-value]


def _decode_images(name: str, files: Files) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    def decode(path: Path) -> np.ndarray:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        arrays = list(pool.map(decode, (p for p, _ in files)))
    shape = arrays[0].shape
    for (path, _), arr in zip(files, arrays):
        if arr.shape != shape:
            raise DatasetUnavailable(
                f"{name}: {path} is {arr.shape[1]}x{arr.shape[0]}, expected {shape[1]}x{shape[0]}"
            )
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor([label for _, label in files], dtype=torch.int64)


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 N x C x H x W images, in [0, 1] units (chunked, float64)."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].to(torch.float64).div_(255)
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())
