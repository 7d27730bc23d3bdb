"""Two variants of the synthetic data, built to show what the design note argues (docs/experiments.md):

- ``render_fine``: thin bars, small dots and sharp-cornered shapes, where *resolution* matters. A network that
  predicts at output stride 32 (a 3×3 grid of logits for a 96×96 image) cannot draw a 2-pixel line, however well it
  recognises it; at output stride 8 it has a 12×12 grid. Boundary IoU and trimap IoU measure the difference.
- ``render_context``: whether a shape is foreground depends on a cue far from it: shapes are red or blue, a frame
  around the image is red or blue (at random), and the foreground is the shapes of the frame's colour. A red shape
  is foreground in half of the images, so no local window around a shape can tell its class: only a receptive
  field that reaches the frame (a large one, or image pooling) can.

Like ``render_shapes``, each is a pure function of its Generator, vectorised over pixels (Python loops only over
objects and polygon corners), and scales with ``size`` (every length is a fraction of the image side).
"""
from __future__ import annotations

import numpy as np

from .synthetic import _palette, _polygon_mask, _rotated, shape_mask
from .transforms import resize_bilinear

FINE_KINDS = ("line", "dot", "spike", "star")


def _grid(size: int):
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(coords, coords)          # u: x (columns), v: y (rows)


def _smooth_background(rng, size: int, colours) -> np.ndarray:
    """A smooth field mixing two colours by low-frequency noise (as ``render_shapes``). Shapes: -> (size, size, 3)."""
    cells = int(rng.integers(2, 5))
    t = resize_bilinear(rng.random((cells + 1, cells + 1)).astype(np.float32), (size, size))[..., None]
    return colours[0] * (1 - t) + colours[1] * t


def _far_colour(rng, avoid, min_dist: float, tries: int = 64) -> np.ndarray:
    """A palette colour at least ``min_dist`` (Euclidean, RGB) from every colour in ``avoid``; after ``tries`` draws,
    the farthest one drawn."""
    best, best_d = None, -1.0
    for _ in range(tries):
        c = _palette(rng)[0]
        d = min((float(np.linalg.norm(c - a)) for a in avoid), default=np.inf)
        if d >= min_dist:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def fine_mask(rng, kind: str, u, v) -> np.ndarray:
    """A boolean mask of one fine structure of ``kind`` on the normalised grid ``u, v``.

    "line": a bar 1.5-3.5 % of the side wide (1.4-3.4 px at 96 px); "dot": an ellipse with semi-axes 1.5-4 %;
    "spike": an isosceles triangle with an apex angle of 12-35 degrees; "star": 4-6 points with sharp concave corners.
    """
    cx, cy = rng.uniform(0.05, 0.95, size=2)
    angle = rng.uniform(0, np.pi)
    if kind == "line":
        length, width = rng.uniform(0.3, 0.9), rng.uniform(0.015, 0.035)
        x, y = _rotated(u, v, cx, cy, angle)
        return (np.abs(x) <= length / 2) & (np.abs(y) <= width / 2)
    if kind == "dot":
        a, b = rng.uniform(0.015, 0.04, size=2)
        x, y = _rotated(u, v, cx, cy, angle)
        return (x / a) ** 2 + (y / b) ** 2 <= 1
    if kind == "spike":
        length = rng.uniform(0.15, 0.35)
        half = np.tan(np.deg2rad(rng.uniform(12, 35)) / 2) * length
        xs = np.array([length / 2, -length / 2, -length / 2])
        ys = np.array([0.0, half, -half])
        c, s = np.cos(angle), np.sin(angle)
        return _polygon_mask(u, v, cx + xs * c - ys * s, cy + xs * s + ys * c)
    if kind == "star":
        k = int(rng.integers(4, 7))
        outer, inner = rng.uniform(0.08, 0.16), rng.uniform(0.25, 0.4)
        theta = angle + np.pi * np.arange(2 * k) / k
        radius = np.where(np.arange(2 * k) % 2 == 0, outer, outer * inner)
        return _polygon_mask(u, v, cx + radius * np.cos(theta), cy + radius * np.sin(theta))
    raise ValueError(f"fine_mask: unknown kind {kind!r}, expected one of {FINE_KINDS}")


def render_fine(rng: np.random.Generator, size: int, max_objects: int = 6, empty_prob: float = 0.05,
                max_distractors: int = 2, noise: float = 0.03):
    """Draw one image of fine structures and its mask.

    The foreground is 1..``max_objects`` thin lines, small dots, spikes and stars in flat colours at least 0.35 (RGB
    distance) from the background's colours; the background is a smooth two-colour field with 0..``max_distractors``
    large flat shapes (``render_shapes``' kinds and sizes), NOT in the mask. Colours come from one palette, so a
    pixel's colour does not give its class: size and shape do, within a few pixels.

    Shapes:
        -> image (size, size, 3) float32 in [0, 1], mask (size, size) float32 in {0, 1}.
    """
    u, v = _grid(size)
    colours = _palette(rng, 2)
    image = _smooth_background(rng, size, colours)
    used = list(colours)
    for _ in range(int(rng.integers(0, max_distractors + 1))):
        region = shape_mask(rng, str(rng.choice(("ellipse", "polygon"))), u, v)
        used.append(_palette(rng)[0])
        image[region] = used[-1]
    mask = np.zeros((size, size), dtype=bool)
    n_objects = 0 if rng.random() < empty_prob else int(rng.integers(1, max_objects + 1))
    for _ in range(n_objects):
        region = fine_mask(rng, str(rng.choice(FINE_KINDS, p=(0.4, 0.2, 0.2, 0.2))), u, v)
        image[region] = _far_colour(rng, used, 0.35)
        mask |= region
    sigma = rng.uniform(min(0.01, noise), noise)
    image = image + sigma * rng.standard_normal(image.shape).astype(np.float32)
    return np.clip(image, 0, 1).astype(np.float32), mask.astype(np.float32)


CUE_COLOURS = np.array([[0.85, 0.2, 0.2], [0.2, 0.35, 0.9]], dtype=np.float32)    # red-ish, blue-ish


def render_context(rng: np.random.Generator, size: int, max_objects: int = 3, empty_prob: float = 0.1,
                   max_distractors: int = 3, noise: float = 0.03, frame: float = 0.06):
    """Draw one image whose labels depend on a far cue, and its mask.

    Shapes come in two colours, red-ish and blue-ish (``CUE_COLOURS``, each jittered by up to ±0.08 per channel per
    image). A frame ``frame`` of the side wide (6 %: 6 px at 96) around the image has one of the two, drawn with
    probability 1/2: the *cue*. The foreground is 1..``max_objects`` shapes of the cue's colour (none with probability
    ``empty_prob``); 1..``max_distractors`` shapes of the other colour are background. Shapes are ``render_shapes``'
    kinds at 60 % of their size, inside the frame; a later shape covers an earlier one (and takes its pixels'
    label). The smooth background's two colours are at least 0.3 from both cue colours. Seen through a window that
    does not reach the frame, a red shape is foreground in half of the images and background in the other half.

    Shapes:
        -> image (size, size, 3) float32 in [0, 1], mask (size, size) float32 in {0, 1}.
    """
    u, v = _grid(size)
    colours = np.clip(CUE_COLOURS + rng.uniform(-0.08, 0.08, size=(2, 3)), 0, 1).astype(np.float32)
    c = int(rng.integers(0, 2))
    cue, other = colours[c], colours[1 - c]
    back = [_far_colour(rng, list(CUE_COLOURS), 0.3) for _ in range(2)]
    image = _smooth_background(rng, size, back)
    n_cue = 0 if rng.random() < empty_prob else int(rng.integers(1, max_objects + 1))
    labels = rng.permutation([True] * n_cue + [False] * int(rng.integers(1, max_distractors + 1)))
    su, sv = (u - 0.5) / 0.6 + 0.5, (v - 0.5) / 0.6 + 0.5        # shapes at 60 %, centres in (0.17, 0.83)
    mask = np.zeros((size, size), dtype=bool)
    for is_cue in labels:
        region = shape_mask(rng, str(rng.choice(("ellipse", "polygon", "ring", "bar"), p=(0.3, 0.3, 0.2, 0.2))),
                            su, sv)
        image[region] = cue if is_cue else other
        mask[region] = is_cue
    f = max(2, int(round(frame * size)))
    border = np.ones((size, size), dtype=bool)
    border[f:size - f, f:size - f] = False
    image[border] = cue
    mask[border] = False
    sigma = rng.uniform(min(0.01, noise), noise)
    image = image + sigma * rng.standard_normal(image.shape).astype(np.float32)
    return np.clip(image, 0, 1).astype(np.float32), mask.astype(np.float32)
