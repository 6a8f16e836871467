"""The book's training augmentation on whole batches on the model's device (``data.augment_on=device``).

The loader workers then only hand over decoded uint8 images (from the image cache, or decoded every epoch): each
batch is padded to its largest image (:func:`pad_collate`) and the random resized crop, the horizontal flip and the
ImageNet normalisation run on the device, after the batch is transferred, for every image of the batch at once:

- the crop boxes are drawn per sample, on the CPU, with the distribution of torchvision's
  ``RandomResizedCrop.get_params`` (area fraction uniform in ``scale``, log aspect ratio uniform in ``log(ratio)``,
  ten attempts, then the centre-crop fallback) but vectorised over the batch (:func:`crop_boxes`). torchvision's
  v2 transforms applied to a batch tensor would draw *one* crop for the whole batch;
- on an accelerator, :func:`resized_crops` cuts and resizes all boxes in one ``torchvision.ops.roi_align`` call
  (bilinear, ``aligned=True``, so pixel centres map as in ``Resize``), averaging ``ceil(box side / image_size)``
  samples per output pixel and axis: a box filter that stands in for the triangle filter of
  ``Resize(antialias=True)``, so downscaled crops are antialiased too, but not bit-identical to the loader path's;
- on a CPU, where ``roi_align`` has no vectorised kernel (4x the CPU time of torchvision's), every crop goes
  through torchvision's own uint8 ``resized_crop`` (:func:`resized_crops_per_sample`): the loader path's pixels
  exactly, for the same box and flip;
- the random stream is a generator seeded per batch from (the run's seed, the DDP rank, the number of batches
  augmented so far); that count and the seed travel in checkpoints (the DataModule's ``state_dict``), so a run is
  reproducible and a resumed run draws what the uninterrupted run would have drawn.

The same code runs on a CPU (tests, and CPU users whose loader workers cannot keep up).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as F

from finetune.data.transforms import CROP_SCALE, IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

CROP_RATIO = (3 / 4, 4 / 3)
AUGMENT_ON = ("loader", "device")
RESAMPLING = ("auto", "roi_align", "per_sample")


class RawBatch(NamedTuple):
    """A training batch as the loader hands it over for device-side augmentation.

    ``images``: uint8 ``B x C x H x W``, image ``k`` in the top-left ``sizes[k]`` corner (plus one replicated row
    and column where it is smaller than the batch, so that bilinear sampling at its edge sees its own pixels).
    ``boxes`` (``B x 4``: top, left, height, width) and ``flips`` (bool ``B``) are drawn before the transfer.
    """

    images: torch.Tensor
    sizes: torch.Tensor
    targets: torch.Tensor
    boxes: torch.Tensor | None = None
    flips: torch.Tensor | None = None


def pad_collate(samples: Sequence[tuple[torch.Tensor, int]]) -> RawBatch:
    """Stack ``(uint8 CxHxW image, target)`` samples of different sizes into one padded :class:`RawBatch`.

    In a loader worker the batch is allocated in shared memory (as torch's default collate does), so handing it
    to the main process does not copy it again.
    """
    images = [image for image, _ in samples]
    channels = images[0].shape[0]
    height, width = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    shape = (len(images), channels, height, width)
    if torch.utils.data.get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(math.prod(shape))
        out = torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
    else:
        out = torch.empty(shape, dtype=torch.uint8)
    for k, image in enumerate(images):
        _, h, w = image.shape
        out[k, :, :h, :w] = image
        if h < height:
            out[k, :, h, :w] = image[:, h - 1]
        if w < width:
            out[k, :, : min(h + 1, height), w] = out[k, :, : min(h + 1, height), w - 1]
    sizes = torch.tensor([image.shape[1:] for image in images], dtype=torch.int64)
    targets = torch.tensor([target for _, target in samples], dtype=torch.int64)
    return RawBatch(out, sizes, targets)


def crop_boxes(
    sizes: torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    attempts: int = 10,
) -> torch.Tensor:
    """``(top, left, height, width)`` per image of ``sizes`` (``B x 2``: height, width), int64 ``B x 4``.

    ``RandomResizedCrop.get_params`` for each image independently, all attempts drawn at once: the first attempt
    whose rounded box fits the image wins; images where none fits get the centre crop clamped to ``ratio``.
    """
    sizes = sizes.to(torch.float64)
    height, width = sizes[:, :1], sizes[:, 1:]
    count = sizes.shape[0]
    area = height * width * torch.empty(count, attempts, dtype=torch.float64).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(count, attempts, dtype=torch.float64).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator
    )
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # the first attempt that fits (0 when none does)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    height, width = height.squeeze(1), width.squeeze(1)
    # Uniform integer offsets, as torch.randint(0, n + 1) would draw them.
    top = torch.floor(torch.rand(count, dtype=torch.float64, generator=generator) * (height - h + 1))
    left = torch.floor(torch.rand(count, dtype=torch.float64, generator=generator) * (width - w + 1))

    fallback = ~fits.any(dim=1)
    if fallback.any():
        in_ratio = width / height
        narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
        fw = torch.where(wide, torch.round(height * max(ratio)), width)
        fh = torch.where(narrow, torch.round(width / min(ratio)), height)
        w, h = torch.where(fallback, fw, w), torch.where(fallback, fh, h)
        top = torch.where(fallback, torch.div(height - h, 2, rounding_mode="floor"), top)
        left = torch.where(fallback, torch.div(width - w, 2, rounding_mode="floor"), left)
    return torch.stack([top, left, h, w], dim=1).to(torch.int64)


def crop_rois(boxes: torch.Tensor) -> torch.Tensor:
    """``roi_align``'s boxes (``B x 5``: index, x0, y0, x1, y1, float32) for ``(top, left, height, width)`` boxes."""
    top, left, h, w = boxes.to(torch.float32).unbind(1)
    index = torch.arange(boxes.shape[0], dtype=torch.float32, device=boxes.device)
    return torch.stack([index, left, top, left + w, top + h], dim=1)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Cut box ``k`` out of image ``k`` and resize it to ``size x size``, all at once; float32, uint8 value range.

    ``sampling_ratio=0``: ``roi_align`` averages ``ceil(box height / size) x ceil(box width / size)`` bilinear
    samples per output pixel, which antialiases a downscaled crop (a box filter; ``Resize`` uses a triangle one).
    """
    rois = crop_rois(boxes.to(images.device))
    return roi_align(images.float(), rois, output_size=size, sampling_ratio=0, aligned=True)


def resized_crops_per_sample(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 crops, flipped where ``flips`` says, through torchvision's antialiased uint8 resize, one at a time.

    On a CPU the loop runs with one intra-op thread: for ops this small the thread team costs more than it gives,
    and on a busy machine (loader workers, other jobs) its barriers made the loop 4x slower (measured).
    """
    out = torch.empty((len(boxes), images.shape[1], size, size), dtype=torch.uint8, device=images.device)
    with _one_thread() if images.device.type == "cpu" else contextlib.nullcontext():
        for k, ((top, left, h, w), flip) in enumerate(zip(boxes.tolist(), flips.tolist(), strict=True)):
            crop = F.resized_crop(images[k], top, left, h, w, [size, size], antialias=True)
            out[k] = crop.flip(-1) if flip else crop
    return out


@contextlib.contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class DeviceAugment:
    """Random resized crop + horizontal flip + normalisation of :class:`RawBatch` batches, seeded and resumable.

    :meth:`draw` runs before the transfer (CPU, no device synchronisation), :meth:`apply` after it (on the device).
    ``state_dict`` holds the seed and the number of batches drawn so far. ``resampling``: ``auto`` (``roi_align``
    on accelerators, ``per_sample`` on CPUs), or either one forced.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        scale: tuple[float, float] = CROP_SCALE,
        ratio: tuple[float, float] = CROP_RATIO,
        seed: int | None = None,
        resampling: str = "auto",
    ) -> None:
        if resampling not in RESAMPLING:
            raise ValueError(f"Unknown resampling {resampling!r}: choose one of {RESAMPLING}.")
        self.resampling = resampling
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.scale, self.ratio = scale, ratio
        self.seed = torch.initial_seed() if seed is None else seed  # seed_everything's seed, without drawing
        self.batches = 0

    def generator(self, rank: int = 0) -> torch.Generator:
        """The generator of the next batch: seeded from (seed, rank, batches drawn so far)."""
        entropy = np.random.SeedSequence([self.seed % 2**64, rank, self.batches])
        return torch.Generator().manual_seed(int(entropy.generate_state(1, np.uint64)[0] >> 1))

    def draw(self, batch: RawBatch, rank: int = 0) -> RawBatch:
        generator = self.generator(rank)
        self.batches += 1
        boxes = crop_boxes(batch.sizes, generator, self.scale, self.ratio)
        flips = torch.rand(len(boxes), generator=generator) < 0.5
        return batch._replace(boxes=boxes, flips=flips)

    def apply(self, batch: RawBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(normalised float images, targets)`` of a drawn batch, computed where ``batch.images`` lives."""
        if batch.boxes is None:
            batch = self.draw(batch)
        images = batch.images
        with torch.no_grad():
            per_sample = self.resampling == "per_sample" or (self.resampling == "auto" and images.device.type == "cpu")
            if per_sample:
                crops = resized_crops_per_sample(images, batch.boxes.cpu(), batch.flips.cpu(), self.image_size)
                crops = crops.float()
            else:
                crops = resized_crops(images, batch.boxes, self.image_size)
                flips = batch.flips.to(crops.device)
                crops = torch.where(flips[:, None, None, None], crops.flip(-1), crops)
            std = torch.tensor(self.std, device=crops.device).view(1, -1, 1, 1)
            mean = torch.tensor(self.mean, device=crops.device).view(1, -1, 1, 1)
            crops = crops.mul_(1 / (255 * std)).sub_(mean / std)  # (x / 255 - mean) / std
        return crops, batch.targets

    def __call__(self, batch: RawBatch, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(self.draw(batch, rank))

    def state_dict(self) -> dict[str, int]:
        return {"seed": int(self.seed), "batches": int(self.batches)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.batches = int(state["seed"]), int(state["batches"])


def say_where_augmentation_runs(trainer, cache: str) -> None:
    """Warn when data.augment_on=device has no accelerator to run on, and say what data.cache=none still costs."""
    if trainer is not None and trainer.strategy.root_device.type == "cpu":
        log.warning(
            "data.augment_on=device without an accelerator: the random crop, flip and normalisation of training "
            "batches run on the CPU, in the training process (data.augment_on=loader runs them in the loader "
            "workers)."
        )
    if cache == "none":
        log.info(
            "data.augment_on=device with data.cache=none: the loader workers still decode every training image "
            "every epoch; data.cache=memory decodes each once."
        )
