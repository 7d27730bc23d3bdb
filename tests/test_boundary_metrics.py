"""Boundary IoU and trimap IoU against a brute force with explicit per-pixel distance loops, on shifted masks and on
empty masks."""
import math

import numpy as np
import pytest

from minideeplab.backend import to_numpy
from minideeplab.metrics import (
    BoundaryMeter,
    boundary_distance,
    boundary_region,
    erode,
    trimap_band,
)

# -- the brute force: for every pixel, look at every pixel within chessboard distance r ----------------------------


def bf_boundary(mask, d):
    """Pixels of mask with a pixel not in mask, or outside the image, within chessboard distance d."""
    H, W = mask.shape
    out = np.zeros_like(mask)
    for y in range(H):
        for x in range(W):
            if not mask[y, x]:
                continue
            for dy in range(-d, d + 1):
                for dx in range(-d, d + 1):
                    yy, xx = y + dy, x + dx
                    if not (0 <= yy < H and 0 <= xx < W) or not mask[yy, xx]:
                        out[y, x] = True
    return out


def bf_band(truth, w):
    """Pixels with an in-image pixel of the other class within chessboard distance w."""
    H, W = truth.shape
    out = np.zeros_like(truth)
    for y in range(H):
        for x in range(W):
            for dy in range(-w, w + 1):
                for dx in range(-w, w + 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < H and 0 <= xx < W and truth[yy, xx] != truth[y, x]:
                        out[y, x] = True
    return out


def bf_scores(preds, truths, d, widths):
    """Data-set scores from sums of per-image intersections and unions (the meter's definition), brute force."""
    bi = bu = 0
    ti, tu = dict.fromkeys(widths, 0), dict.fromkeys(widths, 0)
    for p, t in zip(preds, truths):
        bp, bt = bf_boundary(p, d), bf_boundary(t, d)
        bi, bu = bi + (bp & bt).sum(), bu + (bp | bt).sum()
        for w in widths:
            band = bf_band(t, w)
            ti[w] += (band & p & t).sum()
            tu[w] += (band & (p | t)).sum()
    out = {"boundary_iou": bi / bu if bu else 1.0}
    out.update({f"trimap_iou_{w}px": ti[w] / tu[w] if tu[w] else float("nan") for w in widths})
    return out


def random_masks(rng, n, H, W):
    """Blobs (thresholded smooth noise) with some isolated pixels: holes, thin parts, border contact."""
    from minideeplab.data.transforms import resize_bilinear
    masks = []
    for _ in range(n):
        field = resize_bilinear(rng.random((4, 5)).astype(np.float32), (H, W))
        m = field > rng.uniform(0.3, 0.7)
        m ^= rng.random((H, W)) < 0.05
        masks.append(m)
    return np.stack(masks)


# -- the building blocks -------------------------------------------------------------------------------------------


def erode3x3_bf(m, outside):
    H, W = m.shape
    out = np.zeros_like(m)
    for y in range(H):
        for x in range(W):
            out[y, x] = all(m[y + dy, x + dx] if 0 <= y + dy < H and 0 <= x + dx < W else outside
                            for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    return out


@pytest.mark.parametrize("outside", [False, True])
def test_erode_is_repeated_3x3_erosion(xp, outside):
    m = random_masks(np.random.default_rng(3), 1, 12, 15)[0]
    expected = m
    for r in range(1, 5):
        expected = erode3x3_bf(expected, outside)
        got = to_numpy(erode(xp.asarray(m), r, outside))
        np.testing.assert_array_equal(got, expected, err_msg=f"radius {r}")


@pytest.mark.parametrize("seed", range(3))
def test_regions_match_brute_force(xp, seed):
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, 3, 13, 11)
    for r in (1, 2, 3, 6, 20):          # 20: larger than the image
        got_b = to_numpy(boundary_region(xp.asarray(masks), r))
        got_t = to_numpy(trimap_band(xp.asarray(masks), r))
        for i, m in enumerate(masks):
            np.testing.assert_array_equal(got_b[i], bf_boundary(m, r), err_msg=f"boundary r={r}")
            np.testing.assert_array_equal(got_t[i], bf_band(m, r), err_msg=f"band r={r}")


def test_boundary_distance_is_two_percent_of_the_diagonal():
    assert boundary_distance(96, 96) == round(0.02 * math.hypot(96, 96)) == 3
    assert boundary_distance(64, 64) == 2
    assert boundary_distance(8, 8) == 1                     # never below 1
    assert boundary_distance(500, 375, 0.02) == round(0.02 * 625) == 12


# -- the meter -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_meter_matches_brute_force_over_batches(xp, seed):
    rng = np.random.default_rng(10 + seed)
    H, W, widths = 14, 12, (1, 2, 5)
    truths = random_masks(rng, 5, H, W)
    preds = random_masks(rng, 5, H, W)
    preds[1] = truths[1]                               # one exact prediction
    preds[2] = np.roll(truths[2], 2, axis=1)           # one shifted
    truths[3][:] = False                               # an empty ground truth with a non-empty prediction
    preds[4][:] = False                                # an empty prediction of a non-empty mask
    d = boundary_distance(H, W)
    meter = BoundaryMeter(widths=widths)
    probs = np.where(preds, 0.8, 0.2).astype(np.float32)[:, None]
    meter.update(xp.asarray(probs[:2]), xp.asarray(truths[:2, None].astype(np.float32)))   # two batches
    meter.update(xp.asarray(probs[2:]), xp.asarray(truths[2:, None].astype(np.float32)))
    got, expected = meter.compute(), bf_scores(preds, truths, d, widths)
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k] == pytest.approx(expected[k], rel=1e-12), k


def square(H, W, top, left, size):
    m = np.zeros((H, W), dtype=bool)
    m[top:top + size, left:left + size] = True
    return m


def test_scores_fall_with_the_shift():
    H = W = 48
    truth = square(H, W, 12, 12, 20)
    scores = []
    for k in range(7):
        meter = BoundaryMeter(widths=(1, 3), distance=2)
        meter.update(square(H, W, 12, 12 + k, 20), truth)          # moved k pixels to the right
        scores.append(meter.compute())
    assert scores[0]["boundary_iou"] == scores[0]["trimap_iou_1px"] == 1.0
    for key in ("boundary_iou", "trimap_iou_1px", "trimap_iou_3px"):
        values = [s[key] for s in scores]
        assert all(a > b for a, b in zip(values, values[1:])), (key, values)
    # the left and right contour bands (2 px wide) no longer meet from k = 2 on: only the top and bottom bands overlap
    assert scores[2]["boundary_iou"] == pytest.approx((2 * 2 * 18) / (2 * (4 * 20 * 2 - 4 * 4) - 2 * 2 * 18))


def test_empty_masks(xp):
    empty, blob = np.zeros((1, 1, 10, 10), np.float32), np.zeros((1, 1, 10, 10), np.float32)
    blob[..., 3:7, 2:8] = 1
    both_empty = BoundaryMeter()
    both_empty.update(xp.asarray(empty), xp.asarray(empty))
    m = both_empty.compute()
    assert m["boundary_iou"] == 1.0                            # 0/0: perfect, as IoU
    assert all(math.isnan(m[k]) for k in m if k.startswith("trimap"))   # no ground-truth boundary: undefined
    missed = BoundaryMeter()                                   # empty prediction of a non-empty mask
    missed.update(xp.asarray(empty), xp.asarray(blob))
    m = missed.compute()
    assert m["boundary_iou"] == 0.0 and all(m[k] == 0.0 for k in m if k.startswith("trimap"))
    false_alarm = BoundaryMeter()                              # a blob predicted on an empty mask
    false_alarm.update(xp.asarray(blob), xp.asarray(empty))
    m = false_alarm.compute()
    assert m["boundary_iou"] == 0.0                            # its contour is all union
    assert all(math.isnan(m[k]) for k in m if k.startswith("trimap"))   # trimap ignores it: no band
    # an image where both are empty changes nothing in a data-set score
    exact, with_empty = BoundaryMeter(), BoundaryMeter()
    shifted = np.roll(blob, 1, axis=-1)
    exact.update(xp.asarray(shifted), xp.asarray(blob))
    with_empty.update(xp.asarray(np.concatenate([shifted, empty])), xp.asarray(np.concatenate([blob, empty])))
    assert exact.compute() == with_empty.compute()


def test_meter_checks_its_input():
    meter = BoundaryMeter()
    with pytest.raises(RuntimeError, match="no images counted"):
        meter.compute()
    with pytest.raises(ValueError, match="BoundaryMeter.update: probs and target must have the same shape"):
        meter.update(np.zeros((1, 1, 4, 4), np.float32), np.zeros((1, 1, 4, 5), np.float32))
    with pytest.raises(ValueError, match="logits"):
        meter.update(np.full((4, 4), 3.0), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="widths"):
        BoundaryMeter(widths=(0, 2))
    with pytest.raises(ValueError, match="threshold"):
        BoundaryMeter(threshold=2)
