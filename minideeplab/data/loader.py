"""Dataset base class and a minimal ``DataLoader`` that stacks items into batches."""
from __future__ import annotations

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
        image, mask = self.raw(self._index(index))
        if self.transform is not None:
            if self.rng is None:
                self.rng = np.random.default_rng()
            image, mask = self.transform(image, mask, self.rng)
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
    """

    def __init__(self, dataset, batch_size: int = 8, shuffle: bool = False, rng: np.random.Generator | None = None,
                 drop_last: bool = False):
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"DataLoader: batch_size must be a positive int, got {batch_size!r}")
        if shuffle and rng is None:
            raise ValueError("DataLoader: shuffle=True needs an explicit rng (numpy.random.Generator)")
        self.dataset, self.batch_size, self.shuffle, self.rng, self.drop_last = (
            dataset, int(batch_size), bool(shuffle), rng, bool(drop_last))

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch_order(self) -> np.ndarray:
        """The item order of the next pass (a fresh permutation when shuffling)."""
        n = len(self.dataset)
        return self.rng.permutation(n) if self.shuffle else np.arange(n)

    def batches(self, order, start: int = 0):
        """Yield the batches of ``order``, beginning with batch number ``start``."""
        for b in range(start, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            items = [self.dataset[int(i)] for i in idx]
            shapes = {tuple(img.shape) for img, _ in items}
            if len(shapes) > 1:
                raise ValueError(f"DataLoader: items of one batch differ in size {sorted(shapes)}; "
                                 "resize them to one size (e.g. --image-size / FolderDataset(size=...))")
            yield np.stack([img for img, _ in items]), np.stack([m for _, m in items])

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
