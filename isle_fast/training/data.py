"""Torch data over stack stores, chunk-aware so stores far larger than memory stream.

:class:`SegmentationDataset` pairs an ``images`` store (``rgb``) with a label
store (``labels``; a ``scores`` store is decoded by argmax with the project's
``decode_scores`` kernel). Training samples are augmented as in the usual
DeepLabV3+ VOC recipe: the image is cut to its true shape (``Stack.shapes``),
scaled by a random factor in [0.5, 2.0], padded (image with the ImageNet mean
colour, label with 255) to at least ``crop`` x ``crop``, randomly cropped and
randomly flipped. Scaling and cropping are one resampling of only the cropped
region (PIL ``resize(box=...)``), so a 2x scale never materialises the whole
enlarged image. Optionally (``fg_crop``, off by default and in the paper's
recipe) a crop is *centred on an object*: with probability ``fg_crop`` the
crop window is placed around a random pixel of a random foreground class of
the image (classes drawn uniformly, so small objects are picked as often as
large ones; the window is shifted to stay inside the scaled image). This
foreground-preferring sampler is for short runs from random weights, where
crops that are mostly background teach mostly "background"; images without
foreground get a uniform crop. Samples are ``uint8`` tensors; :func:`normalize` turns a batch
into ImageNet-normalised floats on the training device (4x less data through
the loader, pinned memory and the host-to-device copy).

Streaming. A Zarr chunk holds several images and is compressed as one unit;
reading images in random order would decode every chunk once *per image*.
:class:`ChunkBatchSampler` instead shuffles *groups* of images that share
chunks (the least common multiple of the two stores' chunk lengths, or the
larger chunk when that gets big), then shuffles images only within a
*window* of consecutive groups; each DataLoader worker keeps a small LRU cache
of decoded chunks (:class:`ChunkCache`), so a chunk is decoded about once
per epoch. With ``W`` workers the batch stream is split into ``W`` contiguous
segments and interleaved so that the DataLoader's round-robin dispatch sends
each segment to one worker (no two workers decode the same window).

Every sample carries its own augmentation seed, drawn by the sampler from
``(seed, epoch)``: the batches and their augmentations are a pure function of
``(seed, epoch, position)`` whatever the number of workers, which is what
makes ``--resume`` continue bit for bit. Datasets pickle their store paths,
never open Zarr groups; each process (worker) reopens the stores itself.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from isle_fast.errors import AlignmentError, InputError, IsleError, param
from isle_fast.stores.stack import Stack, check_aligned, open_stack

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MEAN_PIXEL",
    "normalize",
    "ChunkCache",
    "SegmentationDataset",
    "ChunkBatchSampler",
    "chunk_groups",
    "make_loader",
    "worker_error",
]

#: ImageNet channel mean and standard deviation on the 0-255 scale (torchvision's).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
#: Fill colour of image padding: the mean, so it normalises to about 0.
MEAN_PIXEL = tuple(int(round(m)) for m in IMAGENET_MEAN)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalise a ``uint8`` ``(N, 3, H, W)`` batch into ``float32`` on its device."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float() - mean) / std


class ChunkCache:
    """LRU cache of decoded chunk rows of one array (all images of one chunk along axis 0).

    Parameters
    ----------
    array : zarr.Array
        The ``(I, H, W[, C])`` array.
    capacity : int
        Chunk rows kept.
    """

    def __init__(self, array, capacity: int = 4):
        self.array = array
        self.k = int(array.chunks[0])
        self.capacity = max(1, int(capacity))
        self.blocks: OrderedDict[int, np.ndarray] = OrderedDict()
        self.decoded = 0  # chunk rows read from the store (for tests and benchmarks)

    def image(self, i: int, h: int, w: int) -> np.ndarray:
        """Image ``i`` cut to ``(h, w)`` (a view into the cached block)."""
        c = i // self.k
        block = self.blocks.get(c)
        if block is None:
            block = np.asarray(self.array[c * self.k:(c + 1) * self.k])
            self.decoded += 1
            self.blocks[c] = block
            while len(self.blocks) > self.capacity:
                self.blocks.popitem(last=False)
        else:
            self.blocks.move_to_end(c)
        return block[i - c * self.k, :h, :w]


def chunk_groups(n: int, k_images: int, k_labels: int, max_group: int | None = None) -> list[tuple[int, int]]:
    """Split ``range(n)`` into runs of images that share chunks of both arrays.

    A run is ``lcm(k_images, k_labels)`` images long (each chunk of either
    array lies in exactly one run); if that exceeds ``max_group`` (default
    ``4 * max(k)``) the larger chunk length is used instead and a chunk of the
    other array may be read by two runs.
    """
    if n <= 0:
        return []
    ka, kb = max(1, int(k_images)), max(1, int(k_labels))
    g = ka * kb // math.gcd(ka, kb)
    limit = max_group if max_group is not None else 4 * max(ka, kb)
    if g > limit:
        g = max(ka, kb)
    return [(s, min(s + g, n)) for s in range(0, n, g)]


class SegmentationDataset(torch.utils.data.Dataset):
    """Images and labels from two aligned stores, augmented for training or whole for evaluation.

    Items are addressed by ``(index, seed)`` pairs (what :class:`ChunkBatchSampler`
    yields) or by a plain ``index`` (seed 0). An item is ``(image, label)``:
    ``uint8`` tensors ``(3, h, w)`` and ``(h, w)``; ``h = w = crop`` when
    ``train``, the image's true shape otherwise.

    Parameters
    ----------
    images : path
        Store of kind ``images``.
    labels : path, optional
        Label store (``labels`` or ``scores`` encoding; any kind but ``images``).
        Without it items carry an all-255 label (prediction).
    train : bool
        Random scale / crop / flip (True) or the whole image (False).
    crop : int
        Side of training crops.
    scale_range : (float, float)
        Range of the random scale factor.
    flip : bool
        Random horizontal flips in training.
    cache_chunks : int, optional
        Chunk rows each array's cache keeps (per process); default enough
        for a sampler window of 2 groups.
    fg_crop : float
        Probability that a training crop is centred on a foreground object
        (see the module docstring); 0 (default): uniform crops, as in the paper's recipe.
    """

    def __init__(self, images: str | os.PathLike, labels: str | os.PathLike | None = None, *,
                 train: bool = True, crop: int = 512, scale_range: tuple[float, float] = (0.5, 2.0),
                 flip: bool = True, cache_chunks: int | None = None, fg_crop: float = 0.0):
        self.images_path = str(images)
        self.labels_path = None if labels is None else str(labels)
        self.train = bool(train)
        self.crop = int(crop)
        if self.crop < 8:
            raise InputError(f"crop must be at least 8 pixels, not {crop}")
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise InputError(f"scale range must be 0 < low <= high, not {scale_range}")
        self.scale_range = (lo, hi)
        self.flip = bool(flip)
        self.fg_crop = float(fg_crop)
        if not 0.0 <= self.fg_crop <= 1.0:
            raise InputError(f"fg_crop must be a probability in [0, 1], not {fg_crop}")
        img, lab = self._open()
        self.ids = list(img.ids)
        self.shapes = img.shapes.copy()
        self.classes = list(lab.classes) if lab is not None else None
        self.label_encoding = lab.encoding if lab is not None else None
        self.image_chunk = int(img.chunks[0])
        self.label_chunk = int(lab.chunks[0]) if lab is not None else self.image_chunk
        if cache_chunks is None:
            g = chunk_groups(len(self.ids), self.image_chunk, self.label_chunk)
            span = (g[0][1] - g[0][0]) if g else 1
            cache_chunks = 2 * (span // min(self.image_chunk, self.label_chunk) + 1) + 1
        self.cache_chunks = int(cache_chunks)
        self._pid: int | None = None

    # -- stores (reopened per process) -------------------------------------------
    def _open(self) -> tuple[Stack, Stack | None]:
        img = open_stack(self.images_path)
        if img.kind != "images":
            raise InputError(f"{param('images')} {self.images_path} is a {img.kind!r} store; "
                             "expected kind 'images'")
        lab = None
        if self.labels_path is not None:
            lab = open_stack(self.labels_path)
            if lab.kind == "images":
                raise InputError(f"labels {self.labels_path} is an images store; expected a label store")
            try:
                check_aligned([img, lab], same_classes=False)
            except AlignmentError as exc:
                raise AlignmentError(f"images and labels do not match: {exc}") from None
        return img, lab

    def _ensure_open(self) -> None:
        if self._pid == os.getpid():
            return
        img, lab = self._open()
        self._img_cache = ChunkCache(img.array, self.cache_chunks)
        self._lab_cache = ChunkCache(lab.array, self.cache_chunks) if lab is not None else None
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key in ("_img_cache", "_lab_cache"):
            state.pop(key, None)
        state["_pid"] = None
        return state

    @property
    def num_classes(self) -> int | None:
        """Classes of the label store (None without labels)."""
        return None if self.classes is None else len(self.classes)

    @property
    def chunks_decoded(self) -> int:
        """Chunk rows this process has decoded so far (images + labels)."""
        if self._pid != os.getpid():
            return 0
        return self._img_cache.decoded + (self._lab_cache.decoded if self._lab_cache else 0)

    def __len__(self) -> int:
        return len(self.ids)

    # -- reading -------------------------------------------------------------------
    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``(h, w, 3)`` and label ``(h, w)`` of image ``i`` at its true shape (uint8)."""
        self._ensure_open()
        h, w = (int(v) for v in self.shapes[i])
        img = self._img_cache.image(i, h, w)
        if self._lab_cache is None:
            lab = np.full((h, w), 255, np.uint8)
        elif self.label_encoding == "scores":
            from isle_fast.backend import get_kernels

            lab = get_kernels("cpu").decode_scores(np.ascontiguousarray(self._lab_cache.image(i, h, w)))
        else:
            lab = self._lab_cache.image(i, h, w)
        return img, lab

    def __getitem__(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(key, (tuple, list)):
            i, seed = int(key[0]), int(key[1])
        else:
            i, seed = int(key), 0
        img, lab = self.read(i)
        if self.train:
            img, lab = self.augment(img, lab, np.random.default_rng(seed))
        img = np.ascontiguousarray(np.asarray(img, np.uint8).transpose(2, 0, 1))
        return torch.from_numpy(img), torch.from_numpy(np.ascontiguousarray(lab, dtype=np.uint8))

    def augment(self, img: np.ndarray, lab: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Random scale, pad, crop and flip of one image / label pair (see the module docstring)."""
        from PIL import Image

        h, w = lab.shape
        crop = self.crop
        s = rng.uniform(*self.scale_range)
        sh, sw = max(1, int(round(h * s))), max(1, int(round(w * s)))
        y0 = int(rng.integers(0, max(sh, crop) - crop + 1))
        x0 = int(rng.integers(0, max(sw, crop) - crop + 1))
        flip = self.flip and rng.random() < 0.5
        if self.fg_crop > 0 and rng.random() < self.fg_crop:
            centre = self._object_pixel(lab, rng)
            if centre is not None:  # centre the window on it (jittered), kept inside the scaled image
                cy = (centre[0] + 0.5) * sh / h + rng.uniform(-0.25, 0.25) * crop
                cx = (centre[1] + 0.5) * sw / w + rng.uniform(-0.25, 0.25) * crop
                y0 = int(np.clip(round(cy - crop / 2), 0, max(sh, crop) - crop))
                x0 = int(np.clip(round(cx - crop / 2), 0, max(sw, crop) - crop))
        out_img = np.empty((crop, crop, 3), np.uint8)
        out_img[:] = MEAN_PIXEL
        out_lab = np.full((crop, crop), 255, np.uint8)
        y1, x1 = min(y0 + crop, sh), min(x0 + crop, sw)
        if y1 > y0 and x1 > x0:
            box = (x0 * w / sw, y0 * h / sh, x1 * w / sw, y1 * h / sh)
            size = (x1 - x0, y1 - y0)
            bilinear, nearest = Image.Resampling.BILINEAR, Image.Resampling.NEAREST
            patch = Image.fromarray(np.ascontiguousarray(img)).resize(size, bilinear, box=box)
            out_img[:y1 - y0, :x1 - x0] = np.asarray(patch)
            lpatch = Image.fromarray(np.ascontiguousarray(lab)).resize(size, nearest, box=box)
            out_lab[:y1 - y0, :x1 - x0] = np.asarray(lpatch)
        if flip:
            out_img = out_img[:, ::-1]
            out_lab = out_lab[:, ::-1]
        return out_img, out_lab


    @staticmethod
    def _object_pixel(lab: np.ndarray, rng: np.random.Generator) -> tuple[int, int] | None:
        """A random pixel of a random foreground class (1..254) of ``lab``; None without foreground."""
        counts = np.bincount(lab.ravel(), minlength=256)
        classes = np.flatnonzero(counts[1:255]) + 1
        if classes.size == 0:
            return None
        c = int(classes[rng.integers(classes.size)])
        ys, xs = np.nonzero(lab == c)
        k = int(rng.integers(ys.size))
        return int(ys[k]), int(xs[k])


class ChunkBatchSampler(torch.utils.data.Sampler):
    """Batches of ``(index, seed)`` in a chunk-friendly shuffled order; see the module docstring.

    Parameters
    ----------
    n : int
        Number of images.
    batch_size : int
    groups : list of (start, stop)
        Runs of images sharing chunks (:func:`chunk_groups`); default one
        run per image (a plain shuffle).
    seed : int
        Base seed; the order of epoch ``e`` depends on ``(seed, e)`` only.
    window : int
        Groups whose images are shuffled together.
    num_workers : int
        DataLoader workers the order is arranged for (0 or 1: one stream).
    shuffle : bool
        False gives the store order (evaluation).
    drop_last : bool
        Drop a last incomplete batch (never when there are fewer images than
        ``batch_size``: then one smaller batch is made).
    """

    def __init__(self, n: int, batch_size: int, groups: Sequence[tuple[int, int]] | None = None, *,
                 seed: int = 0, window: int = 2, num_workers: int = 0, shuffle: bool = True,
                 drop_last: bool = True):
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, not {batch_size}")
        self.n = int(n)
        self.batch_size = int(batch_size)
        self.groups = list(groups) if groups is not None else [(i, i + 1) for i in range(self.n)]
        self.seed = int(seed)
        self.window = max(1, int(window))
        self.num_workers = max(0, int(num_workers))
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch to iterate and the batch to start from (for resuming)."""
        self.epoch = int(epoch)
        self.start = int(start)

    def __len__(self) -> int:
        if self.n == 0:
            return 0
        if self.n < self.batch_size:
            return 1
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """All batches of ``epoch`` in dispatch order."""
        rng = np.random.default_rng([self.seed, epoch])
        seeds = rng.integers(0, 2**62, size=self.n)
        if self.shuffle:
            order_groups = [self.groups[g] for g in rng.permutation(len(self.groups))]
            order: list[int] = []
            for w in range(0, len(order_groups), self.window):
                idx = np.concatenate([np.arange(a, b) for a, b in order_groups[w:w + self.window]])
                order.extend(int(i) for i in rng.permutation(idx))
        else:
            order = list(range(self.n))
        nb = len(self)
        bs = self.batch_size
        batches = [[(i, int(seeds[i])) for i in order[b * bs:(b + 1) * bs]] for b in range(nb)]
        workers = self.num_workers
        if workers <= 1 or nb <= 1 or not self.shuffle:
            return batches
        # Contiguous segments, one per worker, interleaved for round-robin dispatch.
        base, extra = divmod(nb, workers)
        segs, pos = [], 0
        for w in range(workers):
            size = base + (1 if w < extra else 0)
            segs.append(batches[pos:pos + size])
            pos += size
        out = []
        for j in range(base + (1 if extra else 0)):
            for seg in segs:
                if j < len(seg):
                    out.append(seg[j])
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = self.epoch_batches(self.epoch)
        start, self.start = self.start, 0
        yield from batches[start:]


def worker_error(exc: BaseException) -> BaseException:
    """An :class:`~isle_fast.errors.IsleError` raised in a DataLoader worker, as the user should see it.

    PyTorch re-raises a worker's exception in the main process as the same type
    whose message is the worker's whole traceback ("Caught StoreError in
    DataLoader worker process 0. Original Traceback (most recent call last):
    ..."), which the command line would print in full. Returns the same type with
    the original one-line message (``exc`` itself when it is not such a wrapper).
    """
    text = str(exc)
    if not isinstance(exc, IsleError) or "Original Traceback" not in text:
        return exc
    cls = type(exc)
    marker = f"{cls.__module__}.{cls.__qualname__}: "
    if marker not in text:
        return exc
    return cls(text.rsplit(marker, 1)[1].strip())


def make_loader(dataset: SegmentationDataset, sampler: ChunkBatchSampler, *, num_workers: int = 0,
                pin_memory: bool = False, generator: torch.Generator | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` driven by ``sampler`` (workers persist across epochs).

    ``generator`` feeds the DataLoader's own per-iterator seed draw (otherwise it
    consumes the global torch RNG, which would make a resumed run's dropout
    differ from an uninterrupted one).
    """
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=4)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=pin_memory, generator=generator, **kwargs)
