"""Joint image/mask transforms, on host NumPy arrays before batching.

Every transform is a callable ``t(image, mask, rng) -> (image, mask)`` where

- ``image`` is float32 ``(H, W, 3)`` with values in [0, 1] (before ``Normalize``),
- ``mask`` is float32 ``(H, W)`` with values in {0, 1},
- ``rng`` is the ``numpy.random.Generator`` that draws the random choices (ignored by deterministic
  transforms). Passing it explicitly keeps augmentation reproducible and lets a checkpoint save its state.

Geometric transforms move the image and the mask with the same coordinates, so they stay aligned: the mask is
resampled bilinearly like the image and then thresholded at 0.5 (nearest-neighbour sampling would shift edges by
up to half a pixel relative to the bilinear image).
"""
from __future__ import annotations

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _source_coords(out_len: int, in_len: int):
    """Sample positions (half-pixel centres, like ``align_corners=False``): lower index, upper index, weight."""
    pos = (np.arange(out_len, dtype=np.float32) + 0.5) * (in_len / out_len) - 0.5
    pos = np.clip(pos, 0, in_len - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, in_len - 1)
    return lo, hi, (pos - lo).astype(np.float32)


def resize_bilinear(a: np.ndarray, size: tuple[int, int], rows: slice = slice(None),
                    cols: slice = slice(None)) -> np.ndarray:
    """Bilinear resize of the first two axes (vectorised gathers, no pixel loop). ``rows``/``cols``: compute only
    that window of the output, ``resize_bilinear(a, size, rows, cols) == resize_bilinear(a, size)[rows, cols]``.

    Shapes:
        a: (H, W) or (H, W, C) -> (h, w) or (h, w, C) with ``(h, w) = size`` (before the window).
    """
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"resize_bilinear: target size must be positive, got {size}")
    H, W = a.shape[:2]
    if (H, W) == (h, w):
        return a[rows, cols].astype(np.float32, copy=True)
    y0, y1, wy = (c[rows] for c in _source_coords(h, H))
    x0, x1, wx = (c[cols] for c in _source_coords(w, W))
    a = a.astype(np.float32, copy=False)
    extra = (None,) * (a.ndim - 2)
    wy = wy[(slice(None), None) + extra]
    wx = wx[(None, slice(None)) + extra]
    upper, lower = a[y0], a[y1]          # the two source rows of every output row
    top = upper[:, x0] * (1 - wx) + upper[:, x1] * wx
    bottom = lower[:, x0] * (1 - wx) + lower[:, x1] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


def resize_pair(image: np.ndarray, mask: np.ndarray, size: tuple[int, int], rows: slice = slice(None),
                cols: slice = slice(None)):
    """Resize image bilinearly and mask bilinearly + threshold 0.5, so both keep the same geometry (``rows``,
    ``cols``: only that window, as ``resize_bilinear``)."""
    return (resize_bilinear(image, size, rows, cols),
            (resize_bilinear(mask, size, rows, cols) > 0.5).astype(np.float32))


def _check_pair(name: str, image, mask) -> None:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name}: expected image of shape (H, W, 3), got {tuple(image.shape)}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"{name}: mask shape {tuple(mask.shape)} does not match image size {tuple(image.shape[:2])}")


class Compose:
    """Apply transforms in order: ``Compose([Resize(96), RandomHorizontalFlip()])``."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, mask, rng=None):
        for t in self.transforms:
            image, mask = t(image, mask, rng)
        return image, mask

    def __repr__(self):
        return "Compose([" + ", ".join(repr(t) for t in self.transforms) + "])"


class Resize:
    """Resize image and mask to ``size`` (an int for a square, or ``(h, w)``).

    Shapes: image (H, W, 3), mask (H, W) -> image (h, w, 3), mask (h, w).
    """

    def __init__(self, size):
        self.size = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))

    def __call__(self, image, mask, rng=None):
        _check_pair("Resize", image, mask)
        return resize_pair(image, mask, self.size)

    def __repr__(self):
        return f"Resize({self.size})"


class RandomScaleCrop:
    """Rescale by a random factor in ``scale``, then take a random ``size`` crop (zero padding when smaller).

    The padded border is black in the image and background in the mask.

    Shapes: image (H, W, 3), mask (H, W) -> image (size, size, 3), mask (size, size).

    Args:
        size: output side length.
        scale: (low, high) range of the resize factor relative to ``size / max(H, W)``.
    """

    def __init__(self, size: int, scale=(0.75, 1.5)):
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"RandomScaleCrop: scale must be 0 < low <= high, got {scale}")
        self.size, self.scale = int(size), (float(scale[0]), float(scale[1]))

    def __call__(self, image, mask, rng):
        _check_pair("RandomScaleCrop", image, mask)
        H, W = mask.shape
        s = rng.uniform(*self.scale) * self.size / max(H, W)
        h, w = max(1, round(H * s)), max(1, round(W * s))
        ph, pw = max(0, self.size - h), max(0, self.size - w)
        top = left = 0
        if ph or pw:  # pad at a random side so small objects do not always sit in the top-left corner
            top, left = int(rng.integers(0, ph + 1)), int(rng.integers(0, pw + 1))
        y = int(rng.integers(0, h + ph - self.size + 1))     # the crop of the resized, padded pair
        x = int(rng.integers(0, w + pw - self.size + 1))
        # only the resized pixels the crop keeps are computed: rows y - top .. of the resized pair, clipped to it
        r0, c0 = max(0, y - top), max(0, x - left)
        r1, c1 = min(h, y - top + self.size), min(w, x - left + self.size)
        window = resize_pair(image, mask, (h, w), slice(r0, r1), slice(c0, c1))
        out_image = np.zeros((self.size, self.size, 3), np.float32)   # the padding: black, background
        out_mask = np.zeros((self.size, self.size), np.float32)
        rows, cols = slice(r0 + top - y, r1 + top - y), slice(c0 + left - x, c1 + left - x)
        out_image[rows, cols], out_mask[rows, cols] = window
        return out_image, out_mask

    def __repr__(self):
        return f"RandomScaleCrop({self.size}, scale={self.scale})"


class RandomHorizontalFlip:
    """Mirror image and mask left-right with probability ``p``. Shapes: unchanged."""

    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def __call__(self, image, mask, rng):
        _check_pair("RandomHorizontalFlip", image, mask)
        if rng.random() < self.p:
            return image[:, ::-1].copy(), mask[:, ::-1].copy()
        return image, mask

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


class ColorJitter:
    """Random brightness, contrast and saturation factors in ``[1 - b, 1 + b]`` (image only; mask unchanged).

    Shapes: unchanged. Values are clipped to [0, 1].
    """

    def __init__(self, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2):
        self.brightness, self.contrast, self.saturation = float(brightness), float(contrast), float(saturation)

    def __call__(self, image, mask, rng):
        _check_pair("ColorJitter", image, mask)
        b, c, s = (rng.uniform(1 - v, 1 + v) for v in (self.brightness, self.contrast, self.saturation))
        out = image * b
        out = (out - out.mean()) * c + out.mean()
        grey = out @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        out = (out - grey[..., None]) * s + grey[..., None]
        return np.clip(out, 0, 1).astype(np.float32), mask

    def __repr__(self):
        return f"ColorJitter({self.brightness}, {self.contrast}, {self.saturation})"


class Normalize:
    """``(image - mean) / std`` per channel (ImageNet statistics by default). Shapes: unchanged."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    def __call__(self, image, mask, rng=None):
        return ((image - self.mean) / self.std).astype(np.float32), mask

    def __repr__(self):
        return "Normalize()"


def normalize(image: np.ndarray) -> np.ndarray:
    """ImageNet normalisation of an ``(H, W, 3)`` image in [0, 1]."""
    return ((image - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def denormalize(chw: np.ndarray) -> np.ndarray:
    """Undo ImageNet normalisation for display. Shapes: (3, H, W) -> (H, W, 3) in [0, 1]."""
    img = np.transpose(np.asarray(chw, dtype=np.float32), (1, 2, 0)) * IMAGENET_STD + IMAGENET_MEAN
    return np.clip(img, 0, 1)


def to_chw(image: np.ndarray, mask: np.ndarray):
    """Final layout of a dataset item. Shapes: (H, W, 3), (H, W) -> (3, H, W) float32, (1, H, W) float32."""
    return (np.ascontiguousarray(np.transpose(image, (2, 0, 1)), dtype=np.float32),
            np.ascontiguousarray(mask[None], dtype=np.float32))


def train_transform(size: int, scale=(0.75, 1.25), jitter: float = 0.1) -> Compose:
    """The augmentation the trainer uses: random scale + crop to ``size``, flip, colour jitter."""
    return Compose([RandomScaleCrop(size, scale), RandomHorizontalFlip(), ColorJitter(jitter, jitter, jitter)])


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ColorJitter",
    "Compose",
    "Normalize",
    "RandomHorizontalFlip",
    "RandomScaleCrop",
    "Resize",
    "denormalize",
    "normalize",
    "resize_bilinear",
    "resize_pair",
    "to_chw",
    "train_transform",
]
