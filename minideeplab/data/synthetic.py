"""SyntheticShapes: procedurally drawn images with textured objects and their binary masks.

What makes an object foreground is its *texture* (stripes or a checker pattern) and shape, not its colour:
object colours and background colours are drawn from the same palette, the background is a smooth two-colour
field, and flat (untextured) distractor shapes of the same kinds and colours are painted into the background and
are NOT in the mask. A per-pixel classifier on RGB therefore cannot separate the classes (a test fits one), while
a convolutional network sees the texture in a few pixels' neighbourhood.

Every image is a pure function of ``(seed, split, index)``: item ``i`` draws from its own
``numpy.random.default_rng([seed, split, i])``, so it is identical whatever order items are read in. Rendering is
vectorised over the pixel grid (Python loops only over objects and polygon edges).
"""
from __future__ import annotations

import numpy as np

from .loader import SegmentationDataset
from .transforms import resize_bilinear

KINDS = ("ellipse", "polygon", "ring", "bar")
VARIANTS = ("default", "fine", "context")
# TrainConfig.data names of the synthetic sets -> SyntheticShapes variant
SYNTHETIC_DATA = {"shapes": "default", "shapes-fine": "fine", "shapes-context": "context"}


def _palette(rng, k: int = 1) -> np.ndarray:
    """``k`` random RGB colours; foreground and background share this distribution."""
    return rng.uniform(0.12, 0.88, size=(k, 3)).astype(np.float32)


def _rotated(u, v, cx, cy, angle):
    """Coordinates of the grid in a frame centred at (cx, cy) and rotated by ``angle``."""
    dx, dy = u - cx, v - cy
    c, s = np.cos(angle), np.sin(angle)
    return dx * c + dy * s, -dx * s + dy * c


def _polygon_mask(u, v, xs, ys) -> np.ndarray:
    """Even-odd rule point-in-polygon, vectorised over pixels (loop over the polygon's edges only)."""
    inside = np.zeros(u.shape, dtype=bool)
    for k in range(len(xs)):
        x0, y0, x1, y1 = xs[k - 1], ys[k - 1], xs[k], ys[k]
        crosses = (y0 > v) != (y1 > v)
        x_cross = x0 + (v - y0) * (x1 - x0) / ((y1 - y0) if y1 != y0 else 1e-12)
        inside ^= crosses & (u < x_cross)
    return inside


def shape_mask(rng, kind: str, u, v) -> np.ndarray:
    """A boolean mask of one random shape of ``kind`` on the normalised grid ``u, v`` (in [0, 1]).

    Centres may lie slightly outside the image so that some shapes touch or cross the border.
    """
    cx, cy = rng.uniform(-0.05, 1.05, size=2)
    angle = rng.uniform(0, np.pi)
    if kind == "ellipse":
        a, b = rng.uniform(0.17, 0.4, size=2)
        x, y = _rotated(u, v, cx, cy, angle)
        return (x / a) ** 2 + (y / b) ** 2 <= 1
    if kind == "ring":
        a = rng.uniform(0.25, 0.42)
        b = a * rng.uniform(0.7, 1.0)
        inner = rng.uniform(0.35, 0.5)
        x, y = _rotated(u, v, cx, cy, angle)
        q = (x / a) ** 2 + (y / b) ** 2
        return (q <= 1) & (q >= inner ** 2)
    if kind == "polygon":
        k = int(rng.integers(3, 8))
        theta = angle + 2 * np.pi * (np.arange(k) + rng.uniform(-0.3, 0.3, size=k)) / k
        radius = rng.uniform(0.2, 0.42) * rng.uniform(0.75, 1.0, size=k)
        return _polygon_mask(u, v, cx + radius * np.cos(theta), cy + radius * np.sin(theta))
    if kind == "bar":
        length, width = rng.uniform(0.5, 1.0), rng.uniform(0.08, 0.13)
        x, y = _rotated(u, v, cx, cy, angle)
        return (np.abs(x) <= length / 2) & (np.abs(y) <= width / 2)
    raise ValueError(f"shape_mask: unknown kind {kind!r}, expected one of {KINDS}")


def _texture(rng, u, v) -> np.ndarray:
    """A periodic pattern in [0, 1]: stripes or a checker, period 5-10 % of the image side."""
    period = rng.uniform(0.05, 0.1)
    x, y = _rotated(u, v, 0.0, 0.0, rng.uniform(0, np.pi))
    phase = rng.uniform(0, 2 * np.pi)
    if rng.random() < 0.5:
        return 0.5 + 0.5 * np.sin(2 * np.pi * x / period + phase)
    return 0.5 + 0.5 * np.sin(2 * np.pi * x / period + phase) * np.sin(2 * np.pi * y / period)


def _contrasting_pair(rng) -> tuple[np.ndarray, np.ndarray]:
    """Two colours about 0.5-0.75 apart (so a texture made of them is visible)."""
    c1 = _palette(rng)[0]
    direction = rng.standard_normal(3).astype(np.float32)
    direction /= np.linalg.norm(direction) + 1e-8
    c2 = np.clip(c1 + direction * rng.uniform(0.5, 0.75), 0.0, 1.0).astype(np.float32)
    return c1, c2


def render_shapes(rng: np.random.Generator, size: int, max_objects: int = 3, empty_prob: float = 0.1,
                  max_distractors: int = 1, noise: float = 0.03):
    """Draw one image and its mask.

    Shapes:
        -> image (size, size, 3) float32 in [0, 1], mask (size, size) float32 in {0, 1}.

    Args:
        rng: the Generator every random choice comes from.
        size: image side in pixels (shapes and textures scale with it).
        max_objects: foreground objects per image are 1..max_objects (0 with probability ``empty_prob``).
        max_distractors: flat, untextured background shapes per image are 0..max_distractors.
        noise: upper bound of the per-pixel Gaussian noise standard deviation.
    """
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    u, v = np.meshgrid(coords, coords)          # u: x (columns), v: y (rows)
    # background: two palette colours mixed by low-frequency noise
    cells = int(rng.integers(2, 5))
    colours = _palette(rng, 2)
    t = resize_bilinear(rng.random((cells + 1, cells + 1)).astype(np.float32), (size, size))[..., None]
    image = colours[0] * (1 - t) + colours[1] * t
    for _ in range(int(rng.integers(0, max_distractors + 1))):
        region = shape_mask(rng, str(rng.choice(("ellipse", "polygon", "ring"))), u, v)
        image[region] = _palette(rng)[0]
    mask = np.zeros((size, size), dtype=bool)
    n_objects = 0 if rng.random() < empty_prob else int(rng.integers(1, max_objects + 1))
    for _ in range(n_objects):
        region = shape_mask(rng, str(rng.choice(KINDS, p=(0.3, 0.3, 0.2, 0.2))), u, v)
        c1, c2 = _contrasting_pair(rng)
        p = _texture(rng, u[region], v[region])[:, None]      # the texture, at the region's pixels only
        image[region] = c1 * (1 - p) + c2 * p
        mask |= region
    sigma = rng.uniform(0.01, noise)
    image = image + sigma * rng.standard_normal(image.shape).astype(np.float32)
    return np.clip(image, 0, 1).astype(np.float32), mask.astype(np.float32)


def renderer(variant: str):
    """The function that draws one (image, mask) of ``variant``: "default" (``render_shapes``), "fine" or "context"
    (``synthetic_variants``)."""
    from .synthetic_variants import render_context, render_fine
    table = {"default": render_shapes, "fine": render_fine, "context": render_context}
    if variant not in table:
        raise ValueError(f"SyntheticShapes: variant must be one of {VARIANTS}, got {variant!r}")
    return table[variant]


class SyntheticShapes(SegmentationDataset):
    """``n`` procedurally drawn images with textured objects (ellipses, polygons, rings, thin bars) and masks.

    ``variant="fine"`` draws thin lines, dots and sharp corners instead (``synthetic_variants.render_fine``), and
    ``variant="context"`` shapes whose class is given by the colour of a frame around the image
    (``render_context``); see docs/experiments.md.

    Item ``i`` depends only on ``(seed, split, i)`` (``default_rng([seed, split, i])``). Transforms draw from
    ``rng`` instead, so augmentation varies while the underlying images stay fixed.

    Shapes:
        item -> image (3, size, size) float32 (ImageNet-normalised), mask (1, size, size) float32 in {0, 1}.

    Args:
        n: number of items.
        size: image side in pixels.
        seed: selects the set of images.
        split: a second key next to ``seed`` (the trainer uses 0 for training and 1 for validation, so the two
            sets never share an image whatever the seed).
        max_objects, empty_prob, max_distractors, noise: see ``render_shapes`` (or the variant's function); None
            takes that function's default.
        transform, rng, normalize: see ``SegmentationDataset``.
        variant: "default", "fine" or "context".
    """

    def __init__(self, n: int, size: int = 128, seed: int = 0, split: int = 0, max_objects: int | None = None,
                 empty_prob: float | None = None, max_distractors: int | None = None, noise: float | None = None,
                 transform=None, rng=None, normalize: bool = True, variant: str = "default"):
        super().__init__(transform, rng, normalize)
        if int(n) < 0 or int(size) < 8:
            raise ValueError(f"SyntheticShapes: need n >= 0 and size >= 8, got n={n}, size={size}")
        if int(seed) < 0 or int(split) < 0:
            raise ValueError(f"SyntheticShapes: seed and split must be non-negative ints, got {seed}, {split}")
        self.n, self.size, self.seed, self.split = int(n), int(size), int(seed), int(split)
        self.variant, self.render = variant, renderer(variant)
        given = {"max_objects": max_objects, "empty_prob": empty_prob, "max_distractors": max_distractors,
                 "noise": noise}
        self.options = {k: type_(given[k]) for k, type_ in (("max_objects", int), ("empty_prob", float),
                                                             ("max_distractors", int), ("noise", float))
                        if given[k] is not None}

    def __len__(self) -> int:
        return self.n

    def raw(self, index: int):
        rng = np.random.default_rng([self.seed, self.split, index])
        return self.render(rng, self.size, **self.options)

    def __repr__(self):
        variant = f", variant={self.variant!r}" if self.variant != "default" else ""
        return f"SyntheticShapes(n={self.n}, size={self.size}, seed={self.seed}, split={self.split}{variant})"
