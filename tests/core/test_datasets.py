"""Dataset loaders: the real Debian Fashion-MNIST, and every other source on tiny files written here."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from PIL import Image

from fedmef_core.config import DataConfig
from fedmef_core.data import DatasetUnavailable, ImageData, image_shape, load_dataset
from fedmef_core.data.datasets import FASHION_MNIST_DEBIAN_DIR, FASHION_MNIST_ENV, channel_stats

DEBIAN = Path(FASHION_MNIST_DEBIAN_DIR)
needs_debian = pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(), reason="apt-get install dataset-fashion-mnist"
)


@pytest.fixture
def no_download(monkeypatch):
    """Make every torchvision download fail at once, as offline, even on a machine with network."""

    def refuse(self):
        raise RuntimeError("download refused by the test")

    for cls in (tvd.MNIST, tvd.FashionMNIST, tvd.CIFAR10, tvd.CIFAR100):
        monkeypatch.setattr(cls, "download", refuse)


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def tiny_mnist_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def write_fashion_gz(folder: Path, train_n: int = 12, test_n: int = 5) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n, seed in (("train", train_n, 1), ("t10k", test_n, 2)):
        x, y = tiny_mnist_arrays(n, seed)
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(x)))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(y)))
        arrays[f"{prefix}_x"], arrays[f"{prefix}_y"] = x, y
    return arrays


def write_torchvision_raw(raw: Path) -> dict[str, np.ndarray]:
    """torchvision's (Fashion)MNIST layout: uncompressed IDX files in <root>/<Class>/raw/."""
    raw.mkdir(parents=True)
    arrays = {}
    for prefix, n, seed in (("train", 7, 3), ("t10k", 4, 4)):
        x, y = tiny_mnist_arrays(n, seed)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(x))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(y))
        arrays[f"{prefix}_x"], arrays[f"{prefix}_y"] = x, y
    return arrays


# --- Fashion-MNIST from the Debian package -----------------------------------------------------------------


@needs_debian
def test_fashion_mnist_from_debian_files():
    train, test = load_dataset(DataConfig(root="/nonexistent"))  # the Debian files win; root is never read
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.images.is_contiguous()
    assert train.labels.dtype == torch.int64 and train.labels.shape == (60000,)
    assert train.num_classes == 10 and len(train.class_names) == 10 and train.class_names[9] == "Ankle boot"
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    mean, std = channel_stats(train.images)
    assert train.mean == pytest.approx(mean, abs=1e-3) and train.std == pytest.approx(std, abs=1e-3)
    assert load_dataset(DataConfig(root="/nonexistent"))[0] is train  # cached per process


@needs_debian
def test_cifar_shape_pads_and_repeats():
    plain, _ = load_dataset(DataConfig())
    shaped, shaped_test = load_dataset(DataConfig(cifar_shape=True))
    assert shaped.images.shape == (60000, 3, 32, 32) and shaped_test.images.shape == (10000, 3, 32, 32)
    assert shaped.images.is_contiguous()
    for c in range(3):
        assert torch.equal(shaped.images[:, c, 2:30, 2:30], plain.images[:, 0])
    border = shaped.images.clone()
    border[:, :, 2:30, 2:30] = 0
    assert border.count_nonzero() == 0
    assert shaped.mean == plain.mean * 3 and shaped.std == plain.std * 3
    assert torch.equal(shaped.labels, plain.labels)
    # the shape the config alone gives (the planner's, without loading) is the loaded one
    assert plain.shape == image_shape(DataConfig()) == (1, 28, 10)
    assert shaped.shape == image_shape(DataConfig(cifar_shape=True)) == (3, 32, 10)
    assert image_shape(DataConfig(name="cifar100", cifar_shape=True)) == (3, 32, 100)


@needs_debian
def test_limits_keep_the_first_samples():
    full_train, full_test = load_dataset(DataConfig())
    train, test = load_dataset(DataConfig(train_limit=100, test_limit=30))
    assert len(train) == 100 and len(test) == 30
    assert torch.equal(train.images, full_train.images[:100]) and torch.equal(
        test.labels, full_test.labels[:30]
    )
    big, _ = load_dataset(DataConfig(train_limit=10**9))
    assert len(big) == 60000


# --- Fashion-MNIST on tiny files ------------------------------------------------------------------------


def test_tiny_idx_files_via_env_var(tmp_path, monkeypatch):
    arrays = write_fashion_gz(tmp_path / "fm")
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "fm"))
    train, test = load_dataset(DataConfig(root=str(tmp_path / "empty")))
    assert train.images.shape == (12, 1, 28, 28) and test.images.shape == (5, 1, 28, 28)
    assert np.array_equal(train.images[:, 0].numpy(), arrays["train_x"])
    assert np.array_equal(test.labels.numpy(), arrays["t10k_y"].astype(np.int64))
    shaped, _ = load_dataset(DataConfig(root=str(tmp_path / "empty"), cifar_shape=True, train_limit=3))
    assert shaped.images.shape == (3, 3, 32, 32)
    assert np.array_equal(shaped.images[:, 1, 2:30, 2:30].numpy(), arrays["train_x"][:3])


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda b: b[:2] + b"\x09" + b[3:],  # not unsigned bytes
        lambda b: b[:3] + b"\x02" + b[4:],  # wrong number of dims
        lambda b: b[:-1],  # truncated
    ],
)
def test_corrupt_idx_file_is_reported(tmp_path, monkeypatch, corrupt):
    write_fashion_gz(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(corrupt(gzip.decompress(path.read_bytes()))))
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    with pytest.raises(DatasetUnavailable, match="train-images-idx3-ubyte.gz"):
        load_dataset(DataConfig(root=str(tmp_path / "empty")))


def test_fashion_mnist_falls_back_to_torchvision_root(tmp_path, monkeypatch, no_download):
    arrays = write_torchvision_raw(tmp_path / "root" / "FashionMNIST" / "raw")
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "no-debian"))
    train, test = load_dataset(DataConfig(root=str(tmp_path / "root")))
    assert np.array_equal(train.images[:, 0].numpy(), arrays["train_x"])
    assert np.array_equal(test.labels.numpy(), arrays["t10k_y"].astype(np.int64))
    assert train.class_names[0] == "T-shirt/top" and train.mean == (0.2860,)


def test_missing_fashion_mnist_names_every_way_to_get_it(tmp_path, monkeypatch, no_download):
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "no-debian"))
    with pytest.raises(DatasetUnavailable) as info:
        load_dataset(DataConfig(root=str(tmp_path / "root")))
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path / "root") in message and "network" in message


def test_missing_download_fails_fast_offline(tmp_path, monkeypatch):
    """Without the mock: offline, torchvision's real download attempt must fail quickly and be wrapped."""
    import socket

    def no_network(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "no-debian"))
    with pytest.raises(DatasetUnavailable, match="apt-get"):
        load_dataset(DataConfig(root=str(tmp_path / "root")))


# --- MNIST and CIFAR through torchvision, on tiny files in its layout -----------------------------------------


def test_mnist_from_torchvision_layout(tmp_path, no_download):
    arrays = write_torchvision_raw(tmp_path / "MNIST" / "raw")
    train, test = load_dataset(DataConfig(name="mnist", root=str(tmp_path)))
    assert train.images.shape == (7, 1, 28, 28) and test.images.shape == (4, 1, 28, 28)
    assert np.array_equal(train.images[:, 0].numpy(), arrays["train_x"])
    assert train.num_classes == 10 and train.mean == (0.1307,)


def write_cifar(folder: Path, cls, label_key: str, names_key: str, classes: list[str], per_file: int) -> dict:
    """Write CIFAR pickles in torchvision's layout; point the class's md5 table at these files."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    written: dict[str, tuple[np.ndarray, list[int]]] = {}

    def md5(path: Path) -> str:
        return hashlib.md5(path.read_bytes()).hexdigest()

    for table in ("train_list", "test_list"):
        entries = []
        for name, _ in getattr(cls, table):
            rows = rng.integers(0, 256, (per_file, 3 * 32 * 32), dtype=np.uint8)  # CIFAR row: R plane, G, B
            labels = rng.integers(0, len(classes), per_file).tolist()
            with open(folder / name, "wb") as fh:
                pickle.dump({"data": rows, label_key: labels}, fh)
            written[name] = (rows, labels)
            entries.append([name, md5(folder / name)])
        setattr(cls, table, entries)
    meta = dict(cls.meta)
    with open(folder / meta["filename"], "wb") as fh:
        pickle.dump({names_key: classes}, fh)
    meta["md5"] = md5(folder / meta["filename"])
    cls.meta = meta
    return written


@pytest.mark.parametrize(
    "name,cls,label_key,names_key,folder,num_classes",
    [
        ("cifar10", tvd.CIFAR10, "labels", "label_names", "cifar-10-batches-py", 10),
        ("cifar100", tvd.CIFAR100, "fine_labels", "fine_label_names", "cifar-100-python", 100),
    ],
)
def test_cifar_from_torchvision_layout(tmp_path, monkeypatch, no_download, name, cls, label_key, names_key,
                                       folder, num_classes):  # fmt: skip
    # torchvision checks every file's md5 against the real archive's; the test swaps in the md5s of its own
    # tiny files (restored afterwards), so the real integrity check and unpickling run unchanged.
    for attr in ("train_list", "test_list", "meta"):
        monkeypatch.setattr(cls, attr, getattr(cls, attr))
    classes = [f"class{i}" for i in range(num_classes)]
    written = write_cifar(tmp_path / folder, cls, label_key, names_key, classes, per_file=3)
    train, test = load_dataset(DataConfig(name=name, root=str(tmp_path)))
    train_files = [n for n, _ in cls.train_list]
    assert train.images.shape == (3 * len(train_files), 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    assert train.images.is_contiguous() and train.num_classes == num_classes
    assert train.class_names == tuple(classes)
    rows, labels = written[train_files[0]]
    assert np.array_equal(train.images[:3].reshape(3, -1).numpy(), rows)  # planes land in channels
    assert train.labels[:3].tolist() == labels
    assert len(train.mean) == 3 and len(train.std) == 3


def test_corrupt_cifar_is_unavailable(tmp_path, no_download):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"not the real file")
    with pytest.raises(DatasetUnavailable, match="CIFAR10.*could not be downloaded"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))


# --- user folders ------------------------------------------------------------------------------------------


COLOURS = {"airplane": (255, 0, 0), "cat": (0, 0, 255)}


def write_cinic(root: Path) -> None:
    for split in ("train", "test"):
        for cls, colour in COLOURS.items():
            folder = root / "cinic10" / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (32, 32), colour).save(folder / f"{cls}-{i}.png")
    Image.new("L", (32, 32), 128).save(root / "cinic10" / "train" / "cat" / "gray.png")  # CINIC has some


def test_cinic10_folder(tmp_path):
    write_cinic(tmp_path)
    train, test = load_dataset(DataConfig(name="cinic10", root=str(tmp_path)))
    assert train.images.shape == (5, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.class_names == ("airplane", "cat") and train.num_classes == 2
    assert train.labels.tolist() == [0, 0, 1, 1, 1]
    assert train.images[0, :, 0, 0].tolist() == [255, 0, 0]
    assert train.images[4].unique().tolist() == [128]  # cat-0, cat-1, gray: the grey one became RGB
    mean, std = channel_stats(train.images)
    assert train.mean == pytest.approx(mean) and train.std == pytest.approx(std)
    assert train.mean[0] == pytest.approx((2 * 255 + 128) / 5 / 255)


def test_cinic10_missing_or_malformed(tmp_path):
    with pytest.raises(DatasetUnavailable, match=r"Expected layout: .*cinic10/train/<class>/\*\.png"):
        load_dataset(DataConfig(name="cinic10", root=str(tmp_path)))
    write_cinic(tmp_path)
    (tmp_path / "cinic10" / "test" / "dog").mkdir()
    with pytest.raises(DatasetUnavailable, match="different class folders"):
        load_dataset(DataConfig(name="cinic10", root=str(tmp_path)))


def write_tinyimagenet(root: Path) -> None:
    base = root / "tiny-imagenet-200"
    wnids = {"n01443537": (250, 10, 10), "n01629819": (10, 10, 250)}
    for wnid, colour in wnids.items():
        (base / "train" / wnid / "images").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (64, 64), colour).save(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
    (base / "val" / "images").mkdir(parents=True)
    notes = []
    for i, wnid in enumerate(["n01629819", "n01443537", "n01629819"]):
        Image.new("RGB", (64, 64), wnids[wnid]).save(base / "val" / "images" / f"val_{i}.JPEG")
        notes.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(notes) + "\n")


def test_tinyimagenet_folder(tmp_path):
    write_tinyimagenet(tmp_path)
    train, test = load_dataset(DataConfig(name="tinyimagenet", root=str(tmp_path), test_limit=2))
    assert train.images.shape == (6, 3, 64, 64) and test.images.shape == (2, 3, 64, 64)
    assert train.class_names == ("n01443537", "n01629819")
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1] and test.labels.tolist() == [1, 0]
    assert abs(int(test.images[0, 2, 30, 30]) - 250) < 8  # blue image for the second wnid (JPEG is lossy)


def test_tinyimagenet_malformed(tmp_path):
    with pytest.raises(DatasetUnavailable, match="tiny-imagenet-200/train/<wnid>/images"):
        load_dataset(DataConfig(name="tinyimagenet", root=str(tmp_path)))
    write_tinyimagenet(tmp_path)
    notes = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    notes.write_text("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(DatasetUnavailable, match="known wnid"):
        load_dataset(DataConfig(name="tinyimagenet", root=str(tmp_path)))
    notes.unlink()
    with pytest.raises(DatasetUnavailable, match="val_annotations.txt"):
        load_dataset(DataConfig(name="tinyimagenet", root=str(tmp_path)))


def test_image_data_validates_its_fields():
    images = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    labels = torch.zeros(2, dtype=torch.int64)
    ImageData(images, labels, 1, ("a",), (0.5,), (0.5,))
    with pytest.raises(ValueError, match="uint8"):
        ImageData(images.float(), labels, 1, ("a",), (0.5,), (0.5,))
    with pytest.raises(ValueError, match="per channel"):
        ImageData(images, labels, 1, ("a",), (0.5, 0.5), (0.5,))


# --- damaged copies of the real Debian files --------------------------------------------------------------


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _garble_middle(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(range(256)) * 4 + data[middle + 1024 :]


def _not_gzip(data: bytes) -> bytes:
    return b"<html>404 Not Found</html>\n" * 40


def _empty(data: bytes) -> bytes:
    return b""


def _gzip_of_garbage(data: bytes) -> bytes:
    return gzip.compress(b"\x01\x02\x03\x04" * 100)


@needs_debian
@pytest.mark.parametrize(
    "name, damage",
    [
        ("train-labels-idx1-ubyte.gz", _truncate),  # EOFError inside gzip today
        ("t10k-labels-idx1-ubyte.gz", _garble_middle),  # zlib.error / bad CRC today
        ("train-labels-idx1-ubyte.gz", _not_gzip),  # BadGzipFile today
        ("t10k-labels-idx1-ubyte.gz", _empty),
        ("train-labels-idx1-ubyte.gz", _gzip_of_garbage),  # decompresses, but is no IDX file
    ],
    ids=["truncated", "garbled", "not-gzip", "empty", "gzip-of-garbage"],
)
def test_damaged_real_file_is_one_clear_message(tmp_path, monkeypatch, name, damage):
    folder = tmp_path / "fm"  # a new folder per test: load_dataset's cache cannot answer from memory
    folder.mkdir()
    for pair in (("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")):
        for f in pair:
            if f == name:
                (folder / f).write_bytes(damage((DEBIAN / f).read_bytes()))
            else:
                (folder / f).symlink_to(DEBIAN / f)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(folder))
    with pytest.raises(DatasetUnavailable) as info:
        load_dataset(DataConfig(root=str(tmp_path / "empty")))
    message = str(info.value)
    assert message.startswith(f"{folder / name}: ") and "corrupt" in message
    assert "apt-get install --reinstall dataset-fashion-mnist" in message and FASHION_MNIST_ENV in message
    error = info.value  # nothing chained to print under the message
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
