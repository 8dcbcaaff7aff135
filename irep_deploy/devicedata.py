"""Training splits decoded once onto the training device and augmented there (``--device-data``).

A DataLoader decodes, crops, flips and normalises every image on the host, a batch at a time; a
training step captured as a CUDA graph then waits for it. The small in-memory datasets
(Fashion-MNIST, digits, CIFAR-10) fit on a GPU many times over, so :class:`DeviceTrainData` copies
the raw images of the training split (uint8, or digits' float32) and their labels onto the device
once, and makes every batch there: a gather by the epoch's permutation, then the same augmentation
the split's torchvision transform describes (random crop with zero padding, horizontal flip,
scaling to [0, 1], normalisation, cutout, grey copied to every channel), vectorised over the batch.
Nothing is read back on the host and no CPU tensor is made per batch.

The augmentation is read from the split's own transform (:func:`data.transforms_for`'s train
transform), not from a second table, and a transform holding anything else is refused. Given the
same crop offsets, flips and cutout centres it computes what torchvision computes (tests compare
them); its random numbers come from device generators seeded from (seed, epoch, rank), so its
stream differs from the DataLoader's: the same seed gives other, equally distributed, augmentations.

Distributed: every rank takes its shard of one permutation as :class:`DistributedSampler` does
(``drop_last``: the first ``N // world_size * world_size`` of the permutation, every
``world_size``-th from ``rank``), and draws its own augmentations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from .data import Cutout, GreyToChannels, TensorImages, Transformed, canonical, epoch_seed, train_loader
from .errors import UsageError

MODES = ("auto", "on", "off")
#: Share of the GPU's free memory the decoded training split may take (the search's cached validation
#: split may take another quarter: data.VAL_CACHE_GPU_SHARE).
GPU_SHARE = 0.25
# The device generators are seeded apart from torch.manual_seed(epoch_seed(seed, epoch, rank)), which
# train and the search call every epoch for dropout and drop-path: the same seed would make the crops
# replay those draws.
_ORDER_SALT = 0x5EED_0D0E_0000_0001
_AUGMENT_SALT = 0x5EED_A06E_0000_0002
MIB = 1 << 20


# -- the split's raw images -------------------------------------------------------------------------
@dataclass
class _RawSplit:
    """Where a training split's raw images are: ``images`` (N x C x H x W, any N) indexed by
    ``indices``, the split's ``transform``, and ``channels`` when grey is copied to that many."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: Optional[List[int]]
    transform: Any
    channels: Optional[int]

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else int(self.images.shape[0])

    def nbytes(self) -> int:
        per_image = self.images[0].numel() * self.images.element_size() if self.images.shape[0] else 0
        return len(self) * (per_image + 8)  # + the int64 label

    def take(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The split's images and labels, contiguous, in the split's order (still on the host)."""
        if self.indices is None:
            return self.images.contiguous(), self.labels.long()
        index = torch.as_tensor(self.indices, dtype=torch.long)
        return self.images.index_select(0, index).contiguous(), self.labels.long().index_select(0, index)


def _raw_split(dataset: Dataset) -> Union[_RawSplit, str]:
    """The raw images under a training split of :func:`data.load_data` (Transformed, GreyToChannels,
    Subset over TensorImages or torchvision's CIFAR10), or why there are none."""
    transform, channels, indices = None, None, None
    ds: Any = dataset
    while True:
        if isinstance(ds, Transformed):
            if isinstance(ds.transform, GreyToChannels):
                channels = ds.transform.channels
            elif transform is None:
                transform = ds.transform
            else:
                return "the training split has two transforms"
            ds = ds.base
        elif isinstance(ds, Subset):
            inner = list(ds.indices)
            indices = inner if indices is None else [inner[i] for i in indices]
            ds = ds.dataset
        else:
            break
    if isinstance(ds, TensorImages):
        images, labels = ds.images, ds.labels
    elif type(ds).__name__ == "CIFAR10" and getattr(ds, "transform", None) is None \
            and getattr(ds, "target_transform", None) is None:  # torchvision's: N x H x W x C uint8 in .data
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)
        labels = torch.as_tensor(ds.targets, dtype=torch.long)
    else:
        return "the training split is not held in memory as images ({})".format(type(ds).__name__)
    if images.dim() != 4 or images.dtype not in (torch.uint8, torch.float32):
        return "the training images are not N x C x H x W uint8 or float32"
    if transform is None:
        return "the training split has no augmentation transform"
    return _RawSplit(images, labels, indices, transform, channels)


# -- the augmentation -------------------------------------------------------------------------------
class Draws(NamedTuple):
    """The random choices of ``n`` augmented images: crop offsets into the padded image, flips,
    cutout centres (empty tensors where the transform has no such step)."""

    top: torch.Tensor
    left: torch.Tensor
    flip: torch.Tensor
    cy: torch.Tensor
    cx: torch.Tensor

    def part(self, start: int, stop: int) -> "Draws":
        return Draws(*(t[start:stop] if t.numel() else t for t in self))


@dataclass(frozen=True)
class Augmentation:
    """A torchvision train transform as batched tensor arithmetic (see :func:`augmentation_of`)."""

    size: Tuple[int, int]  # H, W of the images (crops keep it)
    padding: int  # zero padding of the random crop (0 and crop=False: no crop)
    crop: bool
    flip_p: float  # probability of a horizontal flip (0: no flip step)
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    cutout: int  # side of the cutout square (0: none)

    def draw(self, n: int, generator: torch.Generator, device: torch.device) -> Draws:
        """The random choices of ``n`` images, drawn from ``generator`` on ``device``, in a fixed order."""
        none = torch.zeros(0, dtype=torch.long, device=device)
        h, w = self.size
        span = 2 * self.padding + 1
        top = torch.randint(0, span, (n,), generator=generator, device=device) if self.crop else none
        left = torch.randint(0, span, (n,), generator=generator, device=device) if self.crop else none
        flip = torch.rand(n, generator=generator, device=device) < self.flip_p if self.flip_p else none.bool()
        cy = torch.randint(0, h, (n,), generator=generator, device=device) if self.cutout else none
        cx = torch.randint(0, w, (n,), generator=generator, device=device) if self.cutout else none
        return Draws(top, left, flip, cy, cx)

    def constants(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Normalize's mean and std as 1 x C x 1 x 1 float32 tensors on ``device`` (made once per loader)."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return mean.to(device), std.to(device)

    def __call__(self, raw: torch.Tensor, draws: Draws, channels: Optional[int] = None,
                 constants: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """Augment a batch of raw images (B x C x H x W, uint8 or float in [0, 1]) with ``draws``:
        float32, normalised, ``channels`` channels when given (grey copied). ``constants``: those of
        :meth:`constants` on the batch's device (made here when not given)."""
        b, c, h, w = raw.shape
        dev = raw.device
        rows = torch.arange(h, device=dev).expand(b, h)
        cols = torch.arange(w, device=dev).expand(b, w)
        if draws.flip.numel():  # RandomHorizontalFlip after RandomCrop: column c of the result is W-1-c of the crop
            cols = torch.where(draws.flip[:, None], (w - 1) - cols, cols)
        x = raw
        if self.crop:  # RandomCrop pads with 0 before ToTensor/Normalize: padding normalises to -mean/std
            p = self.padding
            x = F.pad(x, (p, p, p, p)) if p else x
            rows = rows + draws.top[:, None]
            cols = cols + draws.left[:, None]
        if self.crop or draws.flip.numel():
            batch = torch.arange(b, device=dev)[:, None, None]
            x = x[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # B x H x W x C -> NCHW
        # ToTensor / ConvertImageDtype: uint8 / 255; a float image is taken as it is
        x = x.to(torch.float32).div(255) if raw.dtype == torch.uint8 else x.to(torch.float32)
        mean, std = constants if constants is not None else self.constants(dev)
        x = x.sub(mean).div(std)  # Normalize: sub_(mean).div_(std), in float32
        if self.cutout:  # data.Cutout: the square around (cy, cx), clipped to the image, zeroed after normalising
            top = draws.cy - self.cutout // 2
            left = draws.cx - self.cutout // 2
            r = torch.arange(h, device=dev)[None, :]
            q = torch.arange(w, device=dev)[None, :]
            in_rows = (r >= top[:, None]) & (r < (top + self.cutout)[:, None])
            in_cols = (q >= left[:, None]) & (q < (left + self.cutout)[:, None])
            x = x.masked_fill(in_rows[:, None, :, None] & in_cols[:, None, None, :], 0.0)
        if channels is not None and channels != x.shape[1]:
            x = x.expand(b, channels, h, w)
        return x.contiguous()


def _padding(value: Any) -> Optional[int]:
    """RandomCrop's padding as one side, when it pads every side alike."""
    sides = [value] if isinstance(value, int) else list(value) if isinstance(value, Sequence) else []
    return sides[0] if sides and all(isinstance(s, int) and s == sides[0] for s in sides) else None


def augmentation_of(transform: Any, size: Tuple[int, int], dtype: torch.dtype) -> Union[Augmentation, str]:
    """The :class:`Augmentation` of a torchvision ``Compose`` of (RandomCrop with zero padding)?,
    (RandomHorizontalFlip)?, ToTensor or ConvertImageDtype(float32), Normalize, (Cutout)? -- in that
    order, as :func:`data.transforms_for` builds them -- or why it is not one."""
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", [transform]))
    crop, padding, flip_p, mean, std, cutout = False, 0, 0.0, (), (), 0
    order = ["crop", "flip", "float", "norm", "cutout"]
    kinds: List[str] = []
    for step in steps:
        if isinstance(step, T.RandomCrop):
            kind = "crop"
            pad = _padding(step.padding or 0)
            if pad is None or step.padding_mode != "constant" or step.fill != 0 or step.pad_if_needed \
                    or tuple(step.size) != tuple(size):
                return "its random crop is not a same-size crop with equal zero padding ({!r})".format(step)
            crop, padding = True, pad
        elif isinstance(step, T.RandomHorizontalFlip):
            kind, flip_p = "flip", float(step.p)
        elif isinstance(step, T.ToTensor) or (isinstance(step, T.ConvertImageDtype) and step.dtype == torch.float32):
            kind = "float"
        elif isinstance(step, T.Normalize):
            kind, mean, std = "norm", tuple(float(m) for m in step.mean), tuple(float(s) for s in step.std)
        elif isinstance(step, Cutout):
            kind, cutout = "cutout", step.length
        else:
            return "its transform {!r} is not one the device path does".format(step)
        if kinds and order.index(kind) <= order.index(kinds[-1]):
            return "its transforms are not in the order crop, flip, to-float, normalise, cutout"
        kinds.append(kind)
    if "float" not in kinds or "norm" not in kinds:
        return "its transform does not scale to [0, 1] and normalise"
    if dtype == torch.float32 and any(isinstance(s, T.ToTensor) for s in steps):
        return "ToTensor of float images is not scaled as the device path scales them"
    return Augmentation(size, padding, crop, flip_p, mean, std, cutout)


# -- the loader -------------------------------------------------------------------------------------
def device_data_refusal(data_name: str, train_dataset: Dataset, dev: torch.device, batch_size: int,
                        world_size: int = 1, memory_limit: Optional[int] = None) -> Optional[str]:
    """None when ``train_dataset`` (a train split of :func:`data.load_data`) can be decoded onto ``dev``
    and augmented there in batches of ``batch_size`` per process; else why not, in a few words.

    ``memory_limit``: the bytes the decoded split may take (default: on CUDA a quarter of the GPU's
    free memory, elsewhere no limit: the split is in host memory already)."""
    plan = _plan(data_name, train_dataset, dev, batch_size, world_size, memory_limit)
    return plan if isinstance(plan, str) else None


def _plan(data_name: str, train_dataset: Dataset, dev: torch.device, batch_size: int, world_size: int,
          memory_limit: Optional[int]) -> Union[Tuple[_RawSplit, Augmentation], str]:
    """The raw split and its augmentation (device_data_refusal's checks passed), or why not."""
    if canonical(data_name) == "imagefolder":
        return "imagefolder images are decoded per batch from files"
    raw = _raw_split(train_dataset)
    if isinstance(raw, str):
        return raw
    aug = augmentation_of(raw.transform, tuple(raw.images.shape[-2:]), raw.images.dtype)  # type: ignore[arg-type]
    if isinstance(aug, str):
        return "the training transform: " + aug
    if len(raw) // world_size < batch_size:
        return "the training split's {} examples make no batch of {} on each of {} process(es)".format(
            len(raw), batch_size, world_size)
    need = raw.nbytes()
    what = "the {} MiB allowed".format(_mib(memory_limit)) if memory_limit is not None else ""
    if memory_limit is None and dev.type == "cuda":
        memory_limit = int(torch.cuda.mem_get_info(dev)[0] * GPU_SHARE)
        what = "1/4 of the GPU's free memory ({} MiB)".format(_mib(memory_limit))
    if memory_limit is not None and need > memory_limit:
        return "the decoded split needs {} MiB, more than {}".format(_mib(need), what)
    return raw, aug


def _mib(n: int) -> str:
    return "{:.1f}".format(n / MIB) if n < 10 * MIB else str(round(n / MIB))


class DeviceTrainData:
    """Shuffled, drop-last, augmented batches of a training split made on ``dev``; in use like
    :func:`data.train_loader`'s DataLoader: ``len()`` batches per epoch, iterating yields
    ``(x, y)`` (float32 NCHW normalised, int64) on ``dev``, :meth:`set_epoch` (or
    ``data.set_epoch(loader, seed, epoch)``) before each epoch, ``batch_size`` per process.

    The epoch's order and augmentations are a function of (seed, epoch, rank) alone, so a resumed
    run repeats them. The constructor refuses (UsageError) what :func:`device_data_refusal` refuses."""

    def __init__(self, data_name: str, train_dataset: Dataset, dev: torch.device, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, memory_limit: Optional[int] = None) -> None:
        dev = torch.device(dev)
        plan = _plan(data_name, train_dataset, dev, batch_size, world_size, memory_limit)
        if isinstance(plan, str):
            raise UsageError("--device-data on: {}".format(plan))
        raw, aug = plan
        images, labels = raw.take()
        self.dev = dev
        self.images = images.to(dev)
        self.labels = labels.to(dev)
        self.augmentation = aug
        self._constants = aug.constants(dev)
        self.channels = raw.channels
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.epoch = seed, 0
        self._order_gen = torch.Generator(device=dev)
        self._augment_gen = torch.Generator(device=dev)

    def __len__(self) -> int:
        return (int(self.images.shape[0]) // self.world_size) // self.batch_size

    def set_epoch(self, seed: int, epoch: int) -> None:
        """Make the next pass ``epoch`` of a run seeded ``seed`` (data.set_epoch's signature, less the loader)."""
        self.seed, self.epoch = seed, epoch

    def order(self) -> torch.Tensor:
        """This rank's example indices of the current epoch (on the device), as DistributedSampler
        with drop_last shards one permutation; the first ``len() * batch_size`` are used."""
        n = int(self.images.shape[0])
        self._order_gen.manual_seed(epoch_seed(self.seed, self.epoch) ^ _ORDER_SALT)  # the same on every rank
        perm = torch.randperm(n, generator=self._order_gen, device=self.dev)
        total = n // self.world_size * self.world_size
        return perm[self.rank:total:self.world_size]

    def draws(self) -> Draws:
        """The current epoch's augmentation choices for this rank, one per used example, in batch order."""
        self._augment_gen.manual_seed(epoch_seed(self.seed, self.epoch, self.rank) ^ _AUGMENT_SALT)
        return self.augmentation.draw(len(self) * self.batch_size, self._augment_gen, self.dev)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        # Drawn once per epoch, before the first batch: a batch is then slicing, a gather and arithmetic.
        order, draws = self.order(), self.draws()
        labels = self.labels.index_select(0, order)
        b = self.batch_size
        for step in range(len(self)):
            index = order[step * b:(step + 1) * b]
            x = self.augmentation(self.images.index_select(0, index), draws.part(step * b, (step + 1) * b),
                                  self.channels, self._constants)
            yield x, labels[step * b:(step + 1) * b]


def training_batches(mode: str, data_name: str, train_dataset: Dataset, batch_size: int, seed: int,
                     dev: torch.device, rank: int = 0, world_size: int = 1, workers: int = 0,
                     pin_memory: bool = False) -> Union[DataLoader, DeviceTrainData]:
    """The training batches of a run: :class:`DeviceTrainData` where ``mode`` is ``on``, or ``auto``
    on a CUDA device where :func:`device_data_refusal` says None; else :func:`data.train_loader`'s
    DataLoader. ``on`` where refused is a UsageError naming the reason."""
    if mode not in MODES:
        raise UsageError("--device-data {!r}: choose from {}".format(mode, ", ".join(MODES)))
    dev = torch.device(dev)
    if mode == "on" or (mode == "auto" and dev.type == "cuda"
                        and device_data_refusal(data_name, train_dataset, dev, batch_size, world_size) is None):
        return DeviceTrainData(data_name, train_dataset, dev, batch_size, seed, rank, world_size)
    return train_loader(train_dataset, batch_size, seed, workers, world_size > 1, pin_memory)
