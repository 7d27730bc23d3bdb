"""Dataset base class and a minimal ``DataLoader`` that stacks items into batches."""
from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .transforms import normalize, to_chw


class SegmentationDataset:
    """Base of the datasets: ``raw(i)`` gives an image and its mask, ``__getitem__`` finishes the item.

    An item is ``(image, mask)``: image float32 ``(3, H, W)`` ImageNet-normalised, mask float32 ``(1, H, W)`` in
    {0, 1}. ``transform(image, mask, rng)`` (see ``transforms``) runs on the raw ``(H, W, 3)`` / ``(H, W)`` pair
    before normalisation, drawing its random choices from ``rng``.

    Args:
        transform: joint transform or None.
        rng: ``numpy.random.Generator`` for the transform's random choices (required by random transforms).
        normalize: apply ImageNet mean/std (set False to get [0, 1] images).
    """

    def __init__(self, transform=None, rng: np.random.Generator | None = None, normalize: bool = True):
        self.transform = transform
        self.rng = rng
        self.normalize = normalize

    def __len__(self) -> int:
        raise NotImplementedError

    def raw(self, index: int):
        """``(image (H, W, 3) float32 in [0, 1], mask (H, W) float32 in {0, 1})`` before any transform."""
        raise NotImplementedError

    def _index(self, index) -> int:
        n = len(self)
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"{type(self).__name__}: index must be an int, got {type(index).__name__}")
        if not -n <= index < n:
            raise IndexError(f"{type(self).__name__}: index {index} out of range for {n} items")
        return int(index) % n

    def __getitem__(self, index):
        if self.transform is not None and self.rng is None:
            self.rng = np.random.default_rng()
        return self.item(index, self.rng)

    def item(self, index, rng):
        """``self[index]`` with the transform drawing from ``rng`` instead of ``self.rng`` (``DataLoader``'s
        prefetching thread draws from a copy of it)."""
        image, mask = self.raw(self._index(index))
        if self.transform is not None:
            image, mask = self.transform(image, mask, rng)
        if self.normalize:
            image = normalize(image)
        return to_chw(image, mask)


class DataLoader:
    """Iterate over a dataset in batches: ``(images (N, 3, H, W) float32, masks (N, 1, H, W) float32)``.

    Each pass (``iter(loader)``) draws a new order from ``rng`` when ``shuffle`` is on. For resumable training the
    order can be drawn and consumed separately: ``order = loader.epoch_order()`` then ``loader.batches(order,
    start=k)`` skips the first ``k`` batches without loading them.

    Args:
        dataset: anything with ``__len__`` and ``__getitem__`` returning ``(image, mask)`` arrays.
        batch_size: items per batch.
        shuffle: permute the items each pass.
        rng: ``numpy.random.Generator`` for the permutation (required when ``shuffle``).
        drop_last: skip a final batch smaller than ``batch_size``.
        prefetch: make the next batch in a background thread while the caller works on this one (the data work
            overlaps a training step). The same batches in the same order: the thread draws the augmentation from a
            copy of the dataset's Generator (``dataset.rng``), and the Generator is set to the copy's state after a
            batch when that batch is handed out, so between batches it is exactly where a pass without prefetching
            leaves it (checkpoints save it; a resumed run continues the same augmentations). For datasets with
            ``item(index, rng)`` and ``rng`` (``SegmentationDataset``, ``Subset`` of one); others load as without.
    """

    def __init__(self, dataset, batch_size: int = 8, shuffle: bool = False, rng: np.random.Generator | None = None,
                 drop_last: bool = False, prefetch: bool = False):
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"DataLoader: batch_size must be a positive int, got {batch_size!r}")
        if shuffle and rng is None:
            raise ValueError("DataLoader: shuffle=True needs an explicit rng (numpy.random.Generator)")
        self.dataset, self.batch_size, self.shuffle, self.rng, self.drop_last = (
            dataset, int(batch_size), bool(shuffle), rng, bool(drop_last))
        self.prefetch = bool(prefetch)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch_order(self) -> np.ndarray:
        """The item order of the next pass (a fresh permutation when shuffling)."""
        n = len(self.dataset)
        return self.rng.permutation(n) if self.shuffle else np.arange(n)

    def batches(self, order, start: int = 0):
        """Yield the batches of ``order``, beginning with batch number ``start``."""
        rng = getattr(self.dataset, "rng", None)
        inner = self.dataset.dataset if isinstance(self.dataset, Subset) else self.dataset
        if self.prefetch and hasattr(inner, "item") and (rng is not None or self.dataset.transform is None):
            yield from self._prefetched(order, start, rng)
            return
        for b in range(start, len(self)):
            yield self._batch(order, b, self.dataset.__getitem__)

    def _batch(self, order, b: int, item):
        idx = order[b * self.batch_size:(b + 1) * self.batch_size]
        items = [item(int(i)) for i in idx]
        shapes = {tuple(img.shape) for img, _ in items}
        if len(shapes) > 1:
            raise ValueError(f"DataLoader: items of one batch differ in size {sorted(shapes)}; "
                             "resize them to one size (e.g. --image-size / FolderDataset(size=...))")
        return np.stack([img for img, _ in items]), np.stack([m for _, m in items])

    def _prefetched(self, order, start: int, rng):
        """``batches`` with batch b + 1 made in a background thread while the caller holds batch b (see ``prefetch``)."""
        ahead = copy.deepcopy(rng)          # the thread's Generator; rng itself moves only in this (the caller's) thread

        def make(b):
            batch = self._batch(order, b, lambda i: self.dataset.item(i, ahead))
            return batch, None if ahead is None else ahead.bit_generator.state

        n = len(self)
        with ThreadPoolExecutor(1, thread_name_prefix="minideeplab-prefetch") as pool:
            future = pool.submit(make, start) if start < n else None
            for b in range(start, n):
                batch, state = future.result()
                if b + 1 < n:
                    future = pool.submit(make, b + 1)
                if rng is not None:
                    rng.bit_generator.state = state      # where a pass without prefetching is after batch b
                yield batch

    def __iter__(self):
        return self.batches(self.epoch_order())


class Subset:
    """The items ``indices`` of ``dataset`` (e.g. a train/validation split of one folder).

    Shapes: item -> whatever ``dataset[indices[i]]`` returns.
    """

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        return self.dataset[self.indices[index]]

    @property
    def rng(self):
        """The Generator of the dataset's transform (``DataLoader``'s prefetching copies it)."""
        return getattr(self.dataset, "rng", None)

    @property
    def transform(self):
        return getattr(self.dataset, "transform", None)

    def item(self, index, rng):
        return self.dataset.item(self.indices[index], rng)

class ConcatDataset:
    """The items of several datasets one after the other (e.g. a run's training and validation images).

    Shapes: item -> whatever the dataset holding it returns.
    """

    def __init__(self, datasets):
        self.datasets = list(datasets)
        self.offsets = np.cumsum([0] + [len(d) for d in self.datasets])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"ConcatDataset: index {index} out of range for {len(self)} items")
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.datasets[k][int(index - self.offsets[k])]
