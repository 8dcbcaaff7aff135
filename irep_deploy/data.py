"""Datasets and loaders. Everything is read from local files: nothing is downloaded at run time.

Sources:

- ``fashion-mnist``: the gzipped IDX files of the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``), or the same four files under ``--data-root``.
- ``cifar10``: a directory in torchvision's layout (``ROOT/cifar-10-batches-py``).
- ``imagefolder`` (alias ``imagenet``): any ImageFolder tree with ``ROOT/train/<class>/...`` and ``ROOT/val/<class>/...``
  (ImageNet); ``val`` plays the role of the test set.
- ``digits``: scikit-learn's bundled 8x8 digits (1797 images; for tiny tests). It has no test split,
  so a fixed 20 % of it (seed 0, independent of every run seed) is the test set.

A validation split (for the search) is carved out of the training set with its own seed; it uses
the evaluation transforms. The test set is only for the final evaluation of trained models.

Channels: a network that takes 3 input channels (every torchvision classifier) fed a 1-channel
dataset (Fashion-MNIST, digits) gets the normalised grey channel copied into all 3
(``load_data(..., in_channels=3)``, :class:`GreyToChannels`). Nothing else is changed: no resize, no
ImageNet statistics, so the 3 channels are equal and a pretrained stem sees its grey input. A checkpoint
then records the network's 3 channels, and export, bench and eval feed 3-channel input.
"""
from __future__ import annotations

import gzip
import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler, Subset

from ._io import quote, regular_input
from .errors import DataError, NotAvailableError, UsageError, first_line

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
SPLITS = ("train", "val", "test")
Transform = Callable[[Any], torch.Tensor]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    in_channels: int
    input_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    default_root: Optional[str]
    how_to_get: str


# mean/std: the usual per-channel statistics of each training set.
SPECS: Dict[str, DatasetSpec] = {s.name: s for s in (
    DatasetSpec("fashion-mnist", 1, 28, (0.2860,), (0.3530,), FASHION_MNIST_ROOT,
                "install the Debian package (apt-get install dataset-fashion-mnist) or give --data-root "
                "a directory with train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz"),
    DatasetSpec("cifar10", 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), None,
                "give --data-root a directory holding cifar-10-batches-py (torchvision's layout, e.g. "
                "fetched once elsewhere with torchvision.datasets.CIFAR10(root, download=True))"),
    DatasetSpec("imagefolder", 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), None,
                "give --data-root a directory with train/<class>/<image> and val/<class>/<image> "
                "(the ImageNet layout)"),
    DatasetSpec("digits", 1, 8, (0.30,), (0.38,), None,
                "install scikit-learn (pip install scikit-learn); its digits ship inside the package"),
)}
ALIASES = {"imagenet": "imagefolder"}  # ImageNet is read as an ImageFolder tree
DATASETS = tuple(SPECS) + tuple(ALIASES)


def canonical(name: str) -> str:
    return ALIASES.get(name, name)


def dataset_spec(name: str) -> DatasetSpec:
    try:
        return SPECS[canonical(name)]
    except KeyError as exc:
        raise DataError("unknown dataset {!r} (known: {})".format(name, ", ".join(DATASETS))) from exc


# -- transforms -------------------------------------------------------------------------------------
class Cutout:
    """DARTS's cutout: one square of side ``length`` set to 0 in every channel of a C x H x W tensor,
    after normalisation (so 0 is the mean colour), its centre drawn uniformly over the image: near a
    border only the part inside the image is zeroed, as in DARTS. Draws from torch's global generator
    (seeded per epoch by train)."""

    def __init__(self, length: int) -> None:
        if length < 1:
            raise ValueError("cutout length must be at least 1, got {}".format(length))
        self.length = length

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        top, left = cy - self.length // 2, cx - self.length // 2
        out = x.clone()
        out[..., max(top, 0):max(top + self.length, 0), max(left, 0):max(left + self.length, 0)] = 0
        return out

    def __repr__(self) -> str:
        return "Cutout(length={})".format(self.length)


def transforms_for(name: str, train: bool, cutout: int = 0) -> Transform:
    """Standard augmentation (``train``) or evaluation transform of a dataset; ``cutout`` > 0 adds
    :class:`Cutout` of that side to the augmentation (DARTS's CIFAR recipe).

    - cifar10: ACNet/ResNet CIFAR augmentation: random crop 32 with 4-pixel zero padding, horizontal
      flip, normalise.
    - fashion-mnist: random crop 28 with 2-pixel padding and horizontal flip (garments are roughly
      mirror-symmetric), normalise.
    - imagefolder: RandomResizedCrop 224 + flip; evaluation Resize 256 + CenterCrop 224.
    - digits: random crop 8 with 1-pixel padding (no flip: digits are not symmetric).
    """
    from torchvision import transforms as T

    spec = dataset_spec(name)
    name = spec.name
    norm = T.Normalize(spec.mean, spec.std)
    erase: List[Any] = [Cutout(cutout)] if train and cutout else []
    if name == "imagefolder":
        if train:
            return T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm] + erase)
        return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm])
    # cifar10 yields PIL images; fashion-mnist and digits yield uint8/float CxHxW tensors.
    to_float = T.ToTensor() if name == "cifar10" else T.ConvertImageDtype(torch.float32)
    if not train:
        return T.Compose([to_float, norm])
    aug: List[Any] = {
        "cifar10": [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()],
        "fashion-mnist": [T.RandomCrop(28, padding=2), T.RandomHorizontalFlip()],
        "digits": [T.RandomCrop(8, padding=1)],
    }[name]
    return T.Compose(aug + [to_float, norm] + erase)


class Transformed(Dataset):
    """``(transform(x), y)`` over a dataset of ``(x, y)``: one raw dataset, several transforms."""

    def __init__(self, base: Dataset, transform: Transform) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        x, y = self.base[index]
        return self.transform(x), int(y)


class GreyToChannels:
    """A transform: a 1 x H x W tensor repeated to ``channels`` x H x W (a grey image for a colour network)."""

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(self.channels, *x.shape[1:]).contiguous()


def channel_adapter(name: str, in_channels: Optional[int]) -> Optional[GreyToChannels]:
    """How a dataset's images reach a network taking ``in_channels`` (None: as they are).

    Only grey -> many is defined (copying the channel); anything else is refused in one line."""
    have = dataset_spec(name).in_channels
    if in_channels is None or in_channels == have:
        return None
    if have == 1:
        return GreyToChannels(in_channels)
    raise DataError("the network takes {} input channel(s), {} has {} (only 1-channel data is adapted, by "
                    "copying the grey channel)".format(in_channels, canonical(name), have))


class TensorImages(Dataset):
    """Images held in memory as an N x C x H x W tensor with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


# -- raw sources ------------------------------------------------------------------------------------
_IDX_DTYPES = {0x08: torch.uint8}
#: The most data one IDX file may announce (1 GiB): Fashion-MNIST's largest holds 47 MB, and a small gzip
#: can expand to gigabytes of zeros under a header that claims them.
MAX_IDX_BYTES = 1 << 30
_READ_CHUNK = 1 << 20


def require_regular_file(path: Union[str, Path], what: str, error: Type[DataError] = DataError) -> None:
    """Refuse, before opening it, a ``path`` that is missing or is not a regular file: a FIFO would
    block the open forever, a device would be read without end, a directory is not ``what``."""
    try:
        os.stat(str(path))
    except FileNotFoundError as exc:
        raise error("{}: {} missing".format(path, what)) from exc
    except OSError as exc:
        raise error("{}: cannot read {}: {}".format(path, what, exc.strerror or exc)) from exc
    regular_input(path, what, error)  # _io's one wording: "is a FIFO, not an image"


def _read_exactly(handle: Any, count: int) -> bytes:
    """``count`` bytes (fewer at the end of the stream), read in chunks: a header that lies about the
    size costs no more memory than the stream really holds."""
    parts = bytearray()
    while len(parts) < count:
        chunk = handle.read(min(_READ_CHUNK, count - len(parts)))
        if not chunk:
            break
        parts += chunk
    return bytes(parts)


def read_idx_gz(path: Path) -> torch.Tensor:
    """One gzipped IDX file (the MNIST format: big-endian magic, dims, then uint8 data).

    The stream is decompressed as it is read, so every gzip or deflate fault (bad magic, a broken
    deflate stream, a truncated file, a bad CRC at the end) is caught here and named in one line."""
    require_regular_file(path, "a gzipped IDX file")
    try:
        with gzip.open(str(path), "rb") as handle:
            head = handle.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
                raise DataError("{}: not an IDX file of unsigned bytes".format(path))
            ndim = head[3]
            raw_dims = handle.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise DataError("{}: truncated IDX header ({} dimensions announced)".format(path, ndim))
            dims = [int.from_bytes(raw_dims[4 * i: 4 * i + 4], "big") for i in range(ndim)]
            count = 1
            for d in dims:
                count *= d
            if count > MAX_IDX_BYTES:
                raise DataError("{}: its header announces {} values, more than the {} this reader accepts".format(
                    path, count, MAX_IDX_BYTES))
            data = _read_exactly(handle, count)
            extra = handle.read(1)  # at the end this is where gzip checks the CRC and length
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError("{}: unreadable or corrupt gzip data ({}); reinstall it".format(
            path, first_line(exc))) from exc
    if len(data) < count:
        raise DataError("{}: truncated (header says {} values, file holds {})".format(path, count, len(data)))
    if extra:
        raise DataError("{}: holds more data than its header's {} values".format(path, count))
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(*dims) if count else \
        torch.zeros(dims, dtype=torch.uint8)


FASHION_MNIST_CLASSES = 10
_FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _fashion_mnist(root: Path, part: str) -> Dataset:
    spec = SPECS["fashion-mnist"]
    images_name, labels_name = _FASHION_FILES[part]
    for name in (images_name, labels_name):
        if not os.path.lexists(str(root / name)):
            raise DataError("{}: Fashion-MNIST file missing; {}".format(root / name, spec.how_to_get))
    images, labels = read_idx_gz(root / images_name), read_idx_gz(root / labels_name)
    if images.dim() != 3:
        raise DataError("{}: holds an array of shape {}, not images N x H x W".format(
            root / images_name, tuple(images.shape)))
    if labels.dim() != 1:
        raise DataError("{}: holds an array of shape {}, not N labels".format(root / labels_name, tuple(labels.shape)))
    if images.shape[0] == 0:
        raise DataError("{}: holds no images".format(root / images_name))
    if tuple(images.shape[1:]) != (spec.input_size, spec.input_size):
        raise DataError("{}: images are {} x {}, Fashion-MNIST's are {} x {}".format(
            root / images_name, images.shape[1], images.shape[2], spec.input_size, spec.input_size))
    if images.shape[0] != labels.shape[0]:
        raise DataError("{}: {} images, but {} holds {} labels".format(
            root / images_name, images.shape[0], root / labels_name, labels.shape[0]))
    top = int(labels.max())
    if top >= FASHION_MNIST_CLASSES:
        raise DataError("{}: label {} out of range (Fashion-MNIST has classes 0..{})".format(
            root / labels_name, top, FASHION_MNIST_CLASSES - 1))
    return TensorImages(images.unsqueeze(1), labels.long())


def _cifar10(root: Path, part: str) -> Dataset:
    from torchvision.datasets import CIFAR10

    if not (root / "cifar-10-batches-py").is_dir():
        raise DataError("{}: no cifar-10-batches-py directory; {}".format(root, SPECS["cifar10"].how_to_get))
    try:
        return CIFAR10(str(root), train=(part == "train"), download=False)
    except (RuntimeError, OSError) as exc:
        raise DataError("{}: CIFAR-10 files incomplete or corrupt ({})".format(
            root / "cifar-10-batches-py", first_line(exc))) from exc


#: The largest image decoded, in pixels (width x height): PIL's documented default
#: (``PIL.Image.MAX_IMAGE_PIXELS``, 89,478,485: about 9459 x 9459). A larger image is refused as a likely
#: decompression bomb from its header, before a pixel is decoded; ImageNet's largest is far below it.
MAX_IMAGE_PIXELS = 89_478_485
# what a decoder raises on a hostile or damaged file (PIL formats differ in which)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


class ImageFileError(DataError):
    """An image of an image folder cannot be decoded, or is too large.

    Raised inside a DataLoader worker it comes back as ``ImageFileError(text)`` where ``text`` is the
    worker's whole traceback ("Caught ImageFileError in DataLoader worker process 0. Original
    Traceback ..."); the message kept is the original one line, the traceback's last line."""

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and "\n" in message:
            last = message.rstrip("\n").rsplit("\n", 1)[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


def _pil_open(image_module: Any, handle: Any) -> Any:
    """``PIL.Image.open``, also where another library patched it process-wide: Ultralytics' patch
    imports a HEIF plugin (pi_heif) when PIL cannot identify a file, and without the plugin that is
    an ImportError for what is still a file PIL cannot read."""
    try:
        return image_module.open(handle)
    except ImportError as exc:
        raise image_module.UnidentifiedImageError("cannot identify image file (and {}: {})".format(
            type(exc).__name__, first_line(exc, 80))) from exc


def load_image(path: str) -> Any:
    """An image file as an RGB PIL image; every fault is one line naming the file (ImageFileError)."""
    from PIL import Image

    name = quote(path, 300)
    require_regular_file(path, "an image", ImageFileError)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open(path, "rb") as handle:
                image = _pil_open(Image, handle)
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise ImageFileError("{}: {} x {} pixels, more than the limit of {} (a decompression "
                                         "bomb?)".format(name, width, height, MAX_IMAGE_PIXELS))
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageFileError("{}: more pixels than the limit of {} (a decompression bomb?)".format(
            name, MAX_IMAGE_PIXELS)) from exc
    except _DECODE_ERRORS as exc:
        raise ImageFileError("{}: not a readable image ({})".format(name, first_line(exc, 120))) from exc


def _imagefolder(root: Path, part: str) -> Dataset:
    from torchvision.datasets import ImageFolder

    folder = root / ("train" if part == "train" else "val")
    if not folder.is_dir():
        raise DataError("{}: no such directory; {}".format(folder, SPECS["imagefolder"].how_to_get))
    try:
        # images are decoded when a batch needs them (ImageNet is too large to decode up front):
        # load_image names the file of any fault, also from a DataLoader worker
        return ImageFolder(str(folder), loader=load_image)
    except (FileNotFoundError, OSError) as exc:
        raise DataError("{}: {}".format(folder, first_line(exc))) from exc


_DIGITS_TEST_FRACTION = 0.2


def _digits(part: str) -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise NotAvailableError("the digits dataset needs scikit-learn: pip install scikit-learn") from exc
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    # Fixed test split (seed 0): the same for every run, whatever its seeds.
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_test = int(round(_DIGITS_TEST_FRACTION * len(labels)))
    idx = order[:n_test] if part == "test" else order[n_test:]
    return TensorImages(images[idx], labels[idx])


def raw_dataset(name: str, part: str, root: Optional[str] = None) -> Dataset:
    """The untransformed ``train`` or ``test`` part of a dataset, read from local files."""
    spec = dataset_spec(name)
    name = spec.name
    if root is not None and not str(root).strip():  # "" would silently mean the default root
        raise UsageError("--data-root is an empty path; give a directory, or leave it out for the default")
    if name == "digits":
        return _digits(part)
    where = root or spec.default_root
    if where is None:
        raise DataError("{} needs --data-root: {}".format(name, spec.how_to_get))
    path = Path(where)
    if not path.is_dir():
        problem = "not a directory" if os.path.lexists(str(path)) else "no such directory"
        raise DataError("{}: {}; {}".format(path, problem, spec.how_to_get))
    return {"fashion-mnist": _fashion_mnist, "cifar10": _cifar10, "imagefolder": _imagefolder}[name](path, part)


def _targets(dataset: Dataset) -> Sequence[int]:
    for attr in ("labels", "targets"):
        if hasattr(dataset, attr):
            return [int(t) for t in getattr(dataset, attr)]
    return [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]


# -- splits -----------------------------------------------------------------------------------------
@dataclass
class DataSplits:
    """Transformed ``train`` / ``val`` (None without a val fraction) / ``test`` datasets."""

    name: str
    train: Dataset
    val: Optional[Dataset]
    test: Dataset
    num_classes: int
    in_channels: int
    input_size: int

    def split(self, name: str) -> Dataset:
        if name not in SPLITS:
            raise DataError("unknown split {!r} (known: {})".format(name, ", ".join(SPLITS)))
        ds = getattr(self, name)
        if ds is None:
            raise DataError("there is no val split: give a validation fraction (--val-fraction) > 0")
        return ds

    def with_channels(self, in_channels: int) -> "DataSplits":
        """These splits as a network taking ``in_channels`` sees them (see :func:`channel_adapter`)."""
        adapter = channel_adapter(self.name, in_channels) if in_channels != self.in_channels else None
        return self if adapter is None else self.adapted(adapter)

    def adapted(self, adapter: GreyToChannels) -> "DataSplits":
        def wrap(ds: Optional[Dataset]) -> Optional[Dataset]:
            return None if ds is None else Transformed(ds, adapter)
        return DataSplits(self.name, wrap(self.train), wrap(self.val), wrap(self.test),  # type: ignore[arg-type]
                          self.num_classes, adapter.channels, self.input_size)


def _limited(indices: torch.Tensor, limit: Optional[int]) -> List[int]:
    return indices.tolist() if limit is None else indices[:limit].tolist()


def load_data(name: str, root: Optional[str] = None, val_fraction: float = 0.0, split_seed: int = 0,
              augment: bool = True, limit: Optional[int] = None, parts: Sequence[str] = SPLITS,
              in_channels: Optional[int] = None, cutout: int = 0) -> DataSplits:
    """Read a dataset and build its splits.

    ``val_fraction`` of the training set (a permutation drawn with ``split_seed``) becomes ``val``
    and is removed from ``train``. ``limit`` keeps at most that many examples of each split (a
    seeded random subset; for CPU-scale runs). ``parts`` skips reading what is not needed
    (``("test",)`` reads only the test files); splits not read are empty. ``in_channels`` is what the
    network takes (default: the dataset's own); 1-channel images are then copied into every channel
    (see the module docstring). ``cutout``: the side of the square :class:`Cutout` zeroes in every
    augmented training image (0: none).
    """
    spec = dataset_spec(name)
    adapter = channel_adapter(name, in_channels)
    if not 0.0 <= val_fraction < 1.0:
        raise DataError("validation fraction must lie in [0, 1), got {}".format(val_fraction))
    if limit is not None and limit < 1:
        raise DataError("limit must be at least 1, got {}".format(limit))
    gen = torch.Generator().manual_seed(split_seed)
    eval_tf = transforms_for(name, train=False)
    train_ds: Dataset = TensorImages(torch.empty(0), torch.empty(0))
    val_ds: Optional[Dataset] = None
    test_ds: Dataset = TensorImages(torch.empty(0), torch.empty(0))
    classes: List[int] = []
    if "train" in parts or "val" in parts:
        base = raw_dataset(name, "train", root)
        targets = _targets(base)
        classes = targets
        order = torch.randperm(len(targets), generator=gen)
        n_val = int(round(val_fraction * len(targets)))
        if val_fraction > 0 and (n_val < 1 or n_val >= len(targets)):
            raise DataError("validation fraction {} leaves an empty split of {} training examples".format(
                val_fraction, len(targets)))
        train_tf = transforms_for(name, train=True, cutout=cutout) if augment else eval_tf
        train_ds = Transformed(Subset(base, _limited(order[n_val:], limit)), train_tf)
        if n_val:
            val_ds = Transformed(Subset(base, _limited(order[:n_val], limit)), eval_tf)
    if "test" in parts:
        base = raw_dataset(name, "test", root)
        test_order = torch.randperm(len(base), generator=torch.Generator().manual_seed(split_seed))  # type: ignore[arg-type]
        test_ds = Transformed(Subset(base, sorted(_limited(test_order, limit))) if limit else base, eval_tf)
        if not classes:
            classes = list(_targets(base))
    num_classes = len(getattr(base, "classes", ())) or (max(classes) + 1 if classes else 0)
    data = DataSplits(name, train_ds, val_ds, test_ds, num_classes, spec.in_channels, spec.input_size)
    return data if adapter is None else data.adapted(adapter)


# -- loaders ----------------------------------------------------------------------------------------
def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A seed that depends only on (seed, epoch, rank): each epoch's randomness (shuffle order,
    augmentation, worker seeds) is then independent of how the run got there, so a resumed run
    repeats exactly what an uninterrupted one does."""
    return (seed * 1000003 + epoch * 7919 + rank * 104729) % (2 ** 63)


def train_loader(dataset: Dataset, batch_size: int, seed: int, workers: int = 0,
                 distributed: bool = False, pin_memory: bool = False) -> DataLoader:
    """Shuffled, drop-last loader; call :func:`set_epoch` before each epoch.

    ``batch_size`` is per process. Distributed: a :class:`DistributedSampler` (seeded with
    ``seed``) gives every rank its own shard of each epoch's permutation.
    """
    generator = torch.Generator().manual_seed(seed)
    sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True) if distributed \
        else RandomSampler(dataset, generator=generator)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      num_workers=workers, generator=generator, pin_memory=pin_memory,
                      persistent_workers=False)


def set_epoch(loader: Any, seed: int, epoch: int) -> None:
    """Make the shuffle order and worker seeds of ``epoch`` a function of (seed, epoch) alone.

    ``loader``: a :func:`train_loader`, or a loader with its own ``set_epoch(seed, epoch)``
    (devicedata.DeviceTrainData)."""
    if not isinstance(loader, DataLoader):
        loader.set_epoch(seed, epoch)
        return
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed(seed, epoch))


def eval_loader(dataset: Dataset, batch_size: int, workers: int = 0, rank: int = 0, world_size: int = 1,
                pin_memory: bool = False) -> DataLoader:
    """In-order loader over this rank's shard (every ``world_size``-th example from ``rank``);
    shards are disjoint and cover the set exactly once, so summed counts are exact."""
    shard = dataset if world_size == 1 else Subset(dataset, list(range(rank, len(dataset), world_size)))  # type: ignore[arg-type]
    return DataLoader(shard, batch_size=batch_size, sampler=SequentialSampler(shard), num_workers=workers,
                      pin_memory=pin_memory)
