"""Training data without torchvision: datasets, augmentation in torch ops, sharding, batches.

Four sources, named by ``--data``:

``synthetic``          random uint8 images and labels from a fixed seed (speed tests; nothing to learn
                       beyond memorizing a small pool).
``digits``             scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes), read
                       from the CSV inside the installed package (no download), upsampled to
                       ``image_size`` (32 by default), 3 channels; a fixed split: 1,500 train, 297 test.
``cifar10:DIR``        the CIFAR-10 "python version" batches in ``DIR`` (``data_batch_1..5``,
                       ``test_batch``; ``DIR/cifar-10-batches-py`` is looked into too). No download.
``imagefolder:DIR``    ``DIR/train/<class>/<image>`` and ``DIR/val/<class>/<image>`` (torchvision's
                       ImageFolder layout; ``test`` is accepted for ``val``), decoded with Pillow.

Reproducibility: the random numbers of an augmentation are a hash of ``(seed, epoch, sample
index)`` (:func:`sample_uniform`), not draws from a stateful generator. A sample is augmented the
same way whichever rank, worker process or batch position it lands in, so one process on a
global batch and N processes on its shards see identical inputs, and resuming mid-epoch needs no
generator state, only ``(epoch, batch)``. The epoch order is ``randperm`` seeded by
``seed + epoch``, sharded like ``torch.utils.data.DistributedSampler`` (:class:`ShardedBatches`).
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DataError",
    "Dataset",
    "FolderImages",
    "ShardedBatches",
    "TensorImages",
    "load_data",
    "random_crop",
    "random_hflip",
    "random_resized_crop",
    "read_cifar_batch",
    "sample_uniform",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DATA_KINDS = ("synthetic", "digits", "cifar10:DIR", "imagefolder:DIR")


class DataError(ValueError):
    """A data path or file that cannot be used; the message names it and says what was expected."""


# ----------------------------------------------------------------------------------------------
# counter-based random numbers
# ----------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing function (the "lowbias32"-style xor-shift-multiply), on int64 tensors.

    Values stay in [0, 2^32): each multiplier is < 2^27, so products fit in int64 without overflow.
    """
    x = x & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def sample_uniform(seed: int, epoch: int, indices: torch.Tensor, streams: int) -> torch.Tensor:
    """Uniform numbers in [0, 1) that depend only on ``(seed, epoch, sample index, stream)``.

    Args:
        seed, epoch: run seed and epoch.
        indices: ``[B]`` int64 sample indices (positions in the dataset).
        streams: how many independent numbers per sample.

    Returns:
        ``[B, streams]`` float64.
    """
    key = _hash32(torch.tensor(seed & _MASK32, dtype=torch.int64) ^ _hash32(torch.tensor(epoch, dtype=torch.int64)))
    base = _hash32(indices.to(torch.int64).reshape(-1, 1) ^ key)
    x = _hash32(base + torch.arange(1, streams + 1, dtype=torch.int64) * 0x9E3779B)
    return x.to(torch.float64) / 2.0**32


# ----------------------------------------------------------------------------------------------
# augmentation (float images in [0, 1], vectorized over the batch)
# ----------------------------------------------------------------------------------------------


def random_crop(images: torch.Tensor, padding: int, u: torch.Tensor) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop back to the original size at a per-image offset.

    Args:
        images: ``[B, C, H, W]``.
        padding: pixels added on every side.
        u: ``[B, 2]`` uniforms in [0, 1) choosing the vertical and horizontal offsets.

    Returns:
        ``[B, C, H, W]``.
    """
    if padding <= 0:
        return images
    b, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    oy = (u[:, 0] * (2 * padding + 1)).long().clamp_(max=2 * padding)
    ox = (u[:, 1] * (2 * padding + 1)).long().clamp_(max=2 * padding)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]  # [B, 1, H, 1]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]  # [B, 1, 1, W]
    bi = torch.arange(b)[:, None, None, None]
    ci = torch.arange(c)[None, :, None, None]
    return padded[bi, ci, rows, cols]


def random_hflip(images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images whose ``u < 0.5``. ``images [B, C, H, W]``, ``u [B]`` -> ``[B, C, H, W]``."""
    flip = (u < 0.5).view(-1, 1, 1, 1)
    return torch.where(flip, images.flip(-1), images)


def random_resized_crop(
    images: torch.Tensor,
    size: int,
    u: torch.Tensor,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Inception-style crop (Szegedy et al. 2015): a random area fraction and aspect ratio, resized.

    One draw per image instead of torchvision's up to ten retries: a box larger than the image is
    clamped to it (the aspect ratio then bends toward the image's), which only changes the rare
    extreme draws.

    Args:
        images: ``[B, C, H, W]`` float.
        size: output height and width.
        u: ``[B, 4]`` uniforms: area fraction, log aspect ratio, vertical and horizontal position.

    Returns:
        ``[B, C, size, size]``, bilinear.
    """
    b, _, h, w = images.shape
    u = u.to(torch.float64)
    area = (scale[0] + (scale[1] - scale[0]) * u[:, 0]) * (h * w)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    r = torch.exp(log_r)
    cw = torch.sqrt(area * r).clamp(1, w)
    ch = torch.sqrt(area / r).clamp(1, h)
    x0 = (w - cw) * u[:, 3]
    y0 = (h - ch) * u[:, 2]
    # affine_grid maps output coordinates in [-1, 1] to input coordinates in [-1, 1].
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = cw / w
    theta[:, 0, 2] = (2 * x0 + cw) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (2 * y0 + ch) / h - 1
    grid = F.affine_grid(theta.to(images.dtype), [b, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resize_center_crop(image: torch.Tensor, size: int, crop_fraction: float = 0.875) -> torch.Tensor:
    """Evaluation transform: shorter side to ``size / crop_fraction``, then the central ``size`` square.

    ``image [C, H, W]`` float -> ``[C, size, size]``.
    """
    _, h, w = image.shape
    short = max(size, round(size / crop_fraction))
    nh, nw = (short, max(short, round(w * short / h))) if h <= w else (max(short, round(h * short / w)), short)
    resized = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return resized[:, top : top + size, left : left + size]


# ----------------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Augment:
    """Training augmentation of a dataset: zero-padded random crop, random resized crop, flip."""

    crop_padding: int = 0
    resized_crop: bool = False
    hflip: bool = False


class Dataset:
    """A labelled image set that produces normalized float batches.

    Attributes:
        num_classes: number of labels.
        image_size: output height and width.
        mean, std: per-channel normalization (of images scaled to [0, 1]).
        augment: training augmentation.
    """

    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Augment
    name: str

    def __len__(self) -> int:
        raise NotImplementedError

    def labels(self) -> torch.Tensor:
        """``[N]`` int64 labels of every sample."""
        raise NotImplementedError

    def _images(self, indices: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        """``[B, C, S, S]`` float in [0, 1]; ``u`` (``[B, k]`` uniforms) is given in training."""
        raise NotImplementedError

    def batch(
        self, indices: torch.Tensor, *, train: bool, seed: int = 0, epoch: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Load, augment (when ``train``) and normalize the samples ``indices``.

        Args:
            indices: ``[B]`` int64 positions in the dataset.
            train: apply the training augmentation, keyed by ``(seed, epoch, index)``.

        Returns:
            images ``[B, 3, S, S]`` float32 (normalized), labels ``[B]`` int64.
        """
        indices = torch.as_tensor(indices, dtype=torch.int64)
        u = sample_uniform(seed, epoch, indices, 7) if train else None
        x = self._images(indices, u)
        if train and self.augment.crop_padding:
            x = random_crop(x, self.augment.crop_padding, u[:, 4:6])
        if train and self.augment.hflip:
            x = random_hflip(x, u[:, 6])
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
        return ((x - mean) / std).contiguous(), self.labels()[indices]


class TensorImages(Dataset):
    """Images held in memory as ``uint8 [N, C, H, W]`` (CIFAR-10, digits, synthetic)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: Augment = Augment(),
        name: str = "tensor",
    ) -> None:
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be [N={images.shape[0]}], got {tuple(labels.shape)}")
        self.images = images.contiguous()
        self._labels = labels.to(torch.int64)
        self.num_classes = num_classes
        self.image_size = images.shape[-1]
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment = augment
        self.name = name

    def __len__(self) -> int:
        return self.images.shape[0]

    def labels(self) -> torch.Tensor:
        return self._labels

    def _images(self, indices: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        x = self.images[indices].float().div_(255)
        if u is not None and self.augment.resized_crop:
            x = random_resized_crop(x, self.image_size, u[:, :4])
        return x


class FolderImages(Dataset):
    """Image files decoded with Pillow on demand (``imagefolder:DIR``); RGB, ``image_size`` square."""

    def __init__(
        self,
        files: list[str],
        labels: list[int],
        classes: list[str],
        *,
        image_size: int,
        train: bool,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.files = files
        self._labels = torch.tensor(labels, dtype=torch.int64)
        self.classes = classes
        self.num_classes = len(classes)
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment = Augment(resized_crop=True, hflip=True) if train else Augment()
        self.name = "imagefolder"

    def __len__(self) -> int:
        return len(self.files)

    def labels(self) -> torch.Tensor:
        return self._labels

    def _decode(self, path: str) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(f"cannot read image {path}: {e}") from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255)

    def _images(self, indices: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        out = []
        for k, i in enumerate(indices.tolist()):
            img = self._decode(self.files[i])
            if u is not None:
                out.append(random_resized_crop(img[None], self.image_size, u[k : k + 1, :4])[0])
            else:
                out.append(resize_center_crop(img, self.image_size))
        return torch.stack(out)


# ----------------------------------------------------------------------------------------------
# loaders
# ----------------------------------------------------------------------------------------------


def read_cifar_batch(path: str | os.PathLike[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one CIFAR-10 python batch (a pickled dict with ``data`` [N, 3072] uint8 and ``labels``).

    Returns:
        images ``[N, 3, 32, 32]`` uint8, labels ``[N]`` int64.

    Raises:
        DataError: the file is missing, not a pickle, or not in the CIFAR layout.

    Note: the format is a pickle, and unpickling runs code: read only files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CIFAR-10: missing file {path}")
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:  # a truncated or foreign file raises almost anything from pickle
        raise DataError(f"CIFAR-10: {path} is not a CIFAR python batch (unpickling failed: {e})") from None
    if not isinstance(d, dict):
        raise DataError(f"CIFAR-10: {path} holds a {type(d).__name__}, expected a dict with 'data' and 'labels'")
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise DataError(f"CIFAR-10: {path} has keys {sorted(map(str, d))}, expected 'data' and 'labels'")
    data = np.asarray(d["data"])
    labels = np.asarray(d["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise DataError(
            f"CIFAR-10: {path}: 'data' must be uint8 [N, 3072] with N labels, got {data.dtype} {data.shape} "
            f"and {labels.shape[0]} labels"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"CIFAR-10: {path}: labels must be in 0..9, got {labels.min()}..{labels.max()}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def _cifar_dir(root: Path) -> Path:
    if not root.is_dir():
        raise DataError(f"CIFAR-10: {root} is not a directory (expected the extracted cifar-10-batches-py)")
    if not (root / "data_batch_1").exists() and (root / "cifar-10-batches-py").is_dir():
        return root / "cifar-10-batches-py"
    return root


def load_cifar10(root: str | os.PathLike[str], image_size: int | None = None) -> tuple[Dataset, Dataset]:
    """CIFAR-10 train (50,000) and test (10,000) sets from the python batches in ``root``.

    Raises:
        DataError: naming the first missing or malformed file.
    """
    root = _cifar_dir(Path(root))
    names = [f"data_batch_{i}" for i in range(1, 6)]
    for name in [*names, "test_batch"]:
        if not (root / name).is_file():
            raise DataError(
                f"CIFAR-10: missing file {root / name} (expected data_batch_1..data_batch_5 and test_batch of the "
                "'CIFAR-10 python version', extracted from cifar-10-python.tar.gz; nothing is downloaded)"
            )
    parts = [read_cifar_batch(root / n) for n in names]
    train_x, train_y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    test_x, test_y = read_cifar_batch(root / "test_batch")
    train_x, test_x = _resize_u8(train_x, image_size), _resize_u8(test_x, image_size)
    kw = {"num_classes": 10, "mean": CIFAR10_MEAN, "std": CIFAR10_STD, "name": "cifar10"}
    # He et al. 2016 Sec. 4.2: 4-pixel padding, random 32x32 crop, horizontal flip.
    return (
        TensorImages(train_x, train_y, augment=Augment(crop_padding=4, hflip=True), **kw),
        TensorImages(test_x, test_y, **kw),
    )


def _resize_u8(images: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or size == images.shape[-1]:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as ``[N, 64]`` float (0..16) and ``[N]`` int labels, from scikit-learn's package data."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "--data digits needs scikit-learn's bundled digits dataset: pip install scikit-learn "
            "(or pip install 'fastblocks[experiment]')"
        )
    # Read the CSV shipped in the package directly: importing sklearn.datasets costs seconds.
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if path.is_file():
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float64)
        return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.astype(np.float64), d.target.astype(np.int64)


DIGITS_TEST = 297  # 1,797 = 1,500 train + 297 test


def load_digits(image_size: int | None = None) -> tuple[Dataset, Dataset]:
    """scikit-learn's handwritten digits (UCI optdigits test set): 1,500 train / 297 test images.

    The 8x8 images (values 0..16) are upsampled bilinearly to ``image_size`` (default 32), scaled
    to 0..255 and repeated on 3 channels. The split is a fixed permutation (seed 0), the same on
    every machine. Augmentation: random crop with ``image_size / 8`` pixels of padding (a
    one-source-pixel shift); no flip (a mirrored digit is another symbol).
    """
    size = 32 if image_size is None else image_size
    data, target = _digits_arrays()
    x = torch.from_numpy(data).float().view(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x * 255).round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test_idx, train_idx = perm[:DIGITS_TEST], perm[DIGITS_TEST:]
    train_f = x[train_idx].float() / 255
    mean = tuple(float(m) for m in train_f.mean(dim=(0, 2, 3)))
    std = tuple(float(s) for s in train_f.std(dim=(0, 2, 3)))
    kw = {"num_classes": 10, "mean": mean, "std": std, "name": "digits"}
    pad = max(1, size // 8)
    return (
        TensorImages(x[train_idx], y[train_idx], augment=Augment(crop_padding=pad), **kw),
        TensorImages(x[test_idx], y[test_idx], **kw),
    )


def load_synthetic(
    image_size: int | None = None, num_classes: int = 10, train_size: int = 1024, test_size: int = 256, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """Random uint8 images with random labels from a fixed seed (throughput tests; no augmentation)."""
    size = 32 if image_size is None else image_size
    g = torch.Generator().manual_seed(seed)
    n = train_size + test_size
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, num_classes, (n,), generator=g)
    kw = {"num_classes": num_classes, "mean": (0.5, 0.5, 0.5), "std": (0.29, 0.29, 0.29), "name": "synthetic"}
    return TensorImages(x[:train_size], y[:train_size], **kw), TensorImages(x[train_size:], y[train_size:], **kw)


def _scan_folder(root: Path) -> tuple[list[str], dict[str, list[str]]]:
    if not root.is_dir():
        raise DataError(f"imagefolder: {root} is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"imagefolder: {root} has no class subfolders (expected {root}/<class>/<image>)")
    files: dict[str, list[str]] = {}
    for c in classes:
        found = sorted(str(p) for p in (root / c).rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        if not found:
            raise DataError(
                f"imagefolder: class folder {root / c} has no images (extensions: {', '.join(IMG_EXTENSIONS)})"
            )
        files[c] = found
    return classes, files


def load_imagefolder(root: str | os.PathLike[str], image_size: int | None = None) -> tuple[Dataset, Dataset]:
    """``root/train/<class>/*`` and ``root/val/<class>/*`` (or ``root/test``), decoded with Pillow.

    Training: random resized crop to ``image_size`` (default 224) and flip; evaluation: resize to
    ``image_size / 0.875`` and center crop. Classes are the sorted train subfolder names.
    """
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise DataError("--data imagefolder:DIR needs Pillow: pip install pillow") from None
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"imagefolder: {root} is not a directory (expected {root}/train/<class>/<image>)")
    val_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if not (root / "train").is_dir() or val_dir is None:
        raise DataError(
            f"imagefolder: {root} must hold train/<class>/<image> and val/<class>/<image> (or test/); "
            f"found: {', '.join(sorted(p.name for p in root.iterdir())) or 'nothing'}"
        )
    classes, train_files = _scan_folder(root / "train")
    val_classes, val_files = _scan_folder(val_dir)
    unknown = sorted(set(val_classes) - set(classes))
    if unknown:
        raise DataError(f"imagefolder: {val_dir} has classes missing from {root / 'train'}: {', '.join(unknown[:5])}")
    index = {c: i for i, c in enumerate(classes)}
    size = 224 if image_size is None else image_size

    def build(files: dict[str, list[str]], train: bool) -> FolderImages:
        paths = [p for c in sorted(files) for p in files[c]]
        labels = [index[c] for c in sorted(files) for _ in files[c]]
        return FolderImages(paths, labels, classes, image_size=size, train=train)

    return build(train_files, True), build(val_files, False)


def load_data(spec: str, image_size: int | None = None, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Train and test sets for a ``--data`` value (``synthetic``, ``digits``, ``cifar10:DIR``, ``imagefolder:DIR``).

    Raises:
        DataError: unknown kind, or a path/format problem (the message names the file).
    """
    kind, _, path = spec.partition(":")
    if kind == "synthetic" and not path:
        return load_synthetic(image_size, seed=seed)
    if kind == "digits" and not path:
        return load_digits(image_size)
    if kind in ("cifar10", "imagefolder"):
        if not path:
            raise DataError(f"--data {kind} needs a directory: --data {kind}:DIR")
        path = os.path.expanduser(path)
        return load_cifar10(path, image_size) if kind == "cifar10" else load_imagefolder(path, image_size)
    raise DataError(f"unknown --data {spec!r}; expected one of: {', '.join(DATA_KINDS)}")


# ----------------------------------------------------------------------------------------------
# order and sharding
# ----------------------------------------------------------------------------------------------


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """``[n]`` sample order of an epoch: ``randperm`` seeded by ``seed + epoch`` (or ``arange``)."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


class ShardedBatches:
    """The batches of one rank in one epoch, as ``DistributedSampler`` + a dropping batch sampler.

    The epoch order is padded (by repeating its head) to a multiple of ``world_size`` and rank
    ``r`` takes every ``world_size``-th sample starting at ``r``; its local batches are consecutive
    runs of ``local_batch`` of those. The union over ranks of the k-th local batches is then the
    k-th global batch of a single process: N processes train on the same samples as one.

    Args:
        n: dataset size; seed, epoch: order; rank, world_size: shard.
        local_batch: samples per batch on this rank.
        drop_last: drop the incomplete last batch (training); otherwise keep it and do not pad
            (evaluation: every sample once over all ranks).
        shuffle: permute (training) or keep dataset order (evaluation).
    """

    def __init__(
        self,
        n: int,
        local_batch: int,
        *,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        shuffle: bool = True,
    ) -> None:
        order = epoch_order(n, seed, epoch, shuffle)
        if drop_last:
            total = math.ceil(n / world_size) * world_size
            if total > n:
                order = torch.cat([order, order[: total - n]])
        self.indices = order[rank::world_size]
        self.local_batch = local_batch
        self.drop_last = drop_last

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.indices) // self.local_batch
        return math.ceil(len(self.indices) / self.local_batch)

    def __getitem__(self, k: int) -> torch.Tensor:
        if not 0 <= k < len(self):
            raise IndexError(k)
        return self.indices[k * self.local_batch : (k + 1) * self.local_batch]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[k] for k in range(len(self)))


class _EpochBatches(torch.utils.data.Dataset):
    """Batch ``k`` of an epoch as one item, so a ``DataLoader`` with workers can build batches in parallel."""

    def __init__(self, dataset: Dataset, batches: ShardedBatches, *, train: bool, seed: int, epoch: int) -> None:
        self.dataset, self.batches, self.train, self.seed, self.epoch = dataset, batches, train, seed, epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dataset.batch(self.batches[k], train=self.train, seed=self.seed, epoch=self.epoch)


def iterate_batches(
    dataset: Dataset,
    batches: ShardedBatches,
    *,
    train: bool,
    seed: int,
    epoch: int,
    start: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images [B, 3, S, S], labels [B])`` for batches ``start, start + 1, ...`` of ``batches``.

    With ``num_workers > 0`` the batches are built in worker processes (a ``DataLoader`` over
    whole batches); the result is the same as in-process since the augmentation is keyed by the
    sample, not by a worker's generator.
    """
    items = _EpochBatches(dataset, batches, train=train, seed=seed, epoch=epoch)
    if num_workers <= 0:
        for k in range(start, len(items)):
            yield items[k]
        return
    loader = torch.utils.data.DataLoader(
        items,
        batch_size=None,
        sampler=range(start, len(items)),
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=2,
    )
    yield from loader
