"""Datasets, transforms and the DataLoader."""
import numpy as np
import pytest
from PIL import Image

from minideeplab.data import (
    ColorJitter,
    Compose,
    DataLoader,
    FolderDataset,
    RandomHorizontalFlip,
    RandomScaleCrop,
    Resize,
    SyntheticShapes,
    denormalize,
    load_mask,
)
from minideeplab.data.transforms import IMAGENET_MEAN, IMAGENET_STD, resize_bilinear


# -- SyntheticShapes ------------------------------------------------------------------------------------
def test_synthetic_same_seed_same_items_in_any_order():
    a = SyntheticShapes(6, size=40, seed=3)
    b = SyntheticShapes(6, size=40, seed=3)
    forward = [a[i] for i in range(6)]
    backward = [b[i] for i in reversed(range(6))][::-1]
    for (ia, ma), (ib, mb) in zip(forward, backward):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ma, mb)
    np.testing.assert_array_equal(a[-1][0], forward[5][0])


def test_synthetic_seed_and_split_change_the_images():
    base = SyntheticShapes(3, size=40, seed=0)[1][0]
    assert not np.array_equal(base, SyntheticShapes(3, size=40, seed=1)[1][0])
    assert not np.array_equal(base, SyntheticShapes(3, size=40, seed=0, split=1)[1][0])
    assert not np.array_equal(base, SyntheticShapes(3, size=40, seed=0)[2][0])


def test_synthetic_item_format():
    ds = SyntheticShapes(4, size=48, seed=0)
    image, mask = ds[0]
    assert image.shape == (3, 48, 48) and image.dtype == np.float32
    assert mask.shape == (1, 48, 48) and mask.dtype == np.float32
    assert set(np.unique(mask)) <= {0.0, 1.0}
    raw, _ = SyntheticShapes(4, size=48, seed=0, normalize=False)[0]
    np.testing.assert_allclose(image, (raw - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None],
                               rtol=1e-5, atol=1e-5)
    assert 0 <= raw.min() and raw.max() <= 1
    with pytest.raises(IndexError, match="out of range"):
        ds[4]


def test_synthetic_variety():
    """Empty images, objects touching the border, and a foreground share that is neither tiny nor dominant."""
    ds = SyntheticShapes(80, size=48, seed=0)
    masks = np.stack([ds.raw(i)[1] for i in range(len(ds))])
    empty = (masks.sum(axis=(1, 2)) == 0).sum()
    border = np.concatenate([masks[:, 0], masks[:, -1], masks[:, :, 0], masks[:, :, -1]], axis=1)
    touching = (border.sum(axis=1) > 0).sum()
    assert 2 <= empty <= 20
    assert touching >= 20
    assert 0.08 < masks.mean() < 0.4


def _logistic_regression(x, y, iters=25):
    """Newton's method on (N, d) features with a bias column; returns the weights."""
    x = np.c_[x, np.ones(len(x))]
    w = np.zeros(x.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-x @ w))
        hess = (x * (p * (1 - p))[:, None]).T @ x / len(y) + 1e-6 * np.eye(len(w))
        w -= np.linalg.solve(hess, x.T @ (p - y) / len(y))
    return w


def test_per_pixel_colour_does_not_solve_synthetic_shapes():
    """A 1x1 'network' (logistic regression on a pixel's RGB, fit here) stays far below the 0.85 IoU target,
    even with the IoU-maximising threshold picked on the test images themselves."""
    ds = SyntheticShapes(48, size=48, seed=0, normalize=False)
    pairs = [ds.raw(i) for i in range(len(ds))]

    def rgb(ps):
        return np.concatenate([im.reshape(-1, 3) for im, _ in ps])

    def gt(ps):
        return np.concatenate([m.reshape(-1) for _, m in ps]) > 0.5
    w = _logistic_regression(rgb(pairs[:24]), gt(pairs[:24]).astype(np.float64))
    x_test, y_test = rgb(pairs[24:]), gt(pairs[24:])
    p = 1 / (1 + np.exp(-(np.c_[x_test, np.ones(len(x_test))] @ w)))
    ious = [(p >= t)[y_test].sum() / ((p >= t) | y_test).sum() for t in np.linspace(0.01, 0.99, 99)]
    all_foreground_iou = y_test.mean()
    assert max(ious) < 0.4
    assert max(ious) < all_foreground_iou + 0.1   # colour carries (almost) no information


# -- FolderDataset ----------------------------------------------------------------------------------------
def _save(path, array, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def _good_folder(root, rng):
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 10:25] = 255
    mask[0, 0], mask[0, 1] = 128, 127            # the documented rule: > 127 is foreground
    _save(root / "images" / "a.png", rgb)
    _save(root / "masks" / "a.png", mask)
    _save(root / "images" / "b.jpg", rgb, "JPEG")
    _save(root / "masks" / "b.png", mask)
    _save(root / "images" / "c.png", rgb[..., 0])                                              # greyscale
    _save(root / "masks" / "c.png", mask)
    _save(root / "images" / "d.png", np.dstack([rgb, np.full((20, 30), 200, np.uint8)]))      # RGBA
    _save(root / "masks" / "d.png", mask)
    return rgb, mask


def test_folder_dataset_reads_pairs(tmp_path, rng):
    rgb, mask = _good_folder(tmp_path, rng)
    ds = FolderDataset(tmp_path, normalize=False)
    assert len(ds) == 4
    image, m = ds[0]
    np.testing.assert_allclose(image, np.transpose(rgb, (2, 0, 1)) / 255.0, atol=1e-6)
    np.testing.assert_array_equal(m[0], (mask > 127).astype(np.float32))
    assert m[0, 0, 0] == 1 and m[0, 0, 1] == 0
    grey, _ = ds[2]
    np.testing.assert_allclose(grey[1], grey[0])
    np.testing.assert_allclose(grey[0], rgb[..., 0] / 255.0, atol=1e-6)
    rgba, _ = ds[3]                               # alpha 200/255, composited over white
    alpha = 200 / 255
    np.testing.assert_allclose(rgba, np.transpose(rgb, (2, 0, 1)) / 255.0 * alpha + (1 - alpha), atol=1e-6)
    resized = FolderDataset(tmp_path, size=16)
    assert resized[1][0].shape == (3, 16, 16) and resized[1][1].shape == (1, 16, 16)


def test_folder_dataset_errors(tmp_path, rng):
    with pytest.raises(ValueError, match="dataset folder not found"):
        FolderDataset(tmp_path / "nope")
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    with pytest.raises(ValueError, match="no images"):
        FolderDataset(tmp_path / "empty")
    (tmp_path / "nomasks" / "images").mkdir(parents=True)
    with pytest.raises(ValueError, match="no 'masks/' subfolder"):
        FolderDataset(tmp_path / "nomasks")

    root = tmp_path / "d"
    _good_folder(root, rng)
    _save(root / "images" / "lonely.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"missing mask.*lonely\.png"):
        FolderDataset(root)
    _save(root / "masks" / "lonely.png", np.zeros((5, 4), np.uint8))
    with pytest.raises(ValueError, match=r"size mismatch: image 'lonely\.png' is 4x4 but mask 'lonely\.png' is 4x5"):
        FolderDataset(root)
    (root / "images" / "lonely.png").write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match=r"cannot read image .*lonely\.png.*not a readable image"):
        FolderDataset(root)

    root = tmp_path / "t"
    _good_folder(root, rng)
    png = (root / "images" / "a.png").read_bytes()
    (root / "images" / "a.png").write_bytes(png[:len(png) // 2])      # header fine, pixel data cut off
    with pytest.raises(ValueError, match=r"cannot decode image .*a\.png.*corrupt or truncated"):
        FolderDataset(root)                                           # found when the dataset is built
    ds = FolderDataset(root, verify=False)                            # unchecked: found when the item is read
    with pytest.raises(ValueError, match=r"cannot decode image .*a\.png.*corrupt or truncated"):
        ds[0]

    root = tmp_path / "01"
    _good_folder(root, rng)
    _save(root / "masks" / "a.png", (np.arange(600).reshape(20, 30) % 2).astype(np.uint8))
    np.testing.assert_array_equal(load_mask(root / "masks" / "a.png"), np.arange(600).reshape(20, 30) % 2)


# -- transforms -------------------------------------------------------------------------------------------
def _coded_pair(rng, h=40, w=52):
    """An image whose red channel IS the mask, so any misalignment shows up as a disagreement."""
    mask = np.zeros((h, w), np.float32)
    mask[8:30, 5:20] = 1
    mask[3:12, 30:48] = 1
    image = rng.random((h, w, 3)).astype(np.float32)
    image[..., 0] = mask
    return image, mask


@pytest.mark.parametrize("transform", [Resize(33), Resize((24, 61)), RandomHorizontalFlip(p=1.0),
                                       RandomScaleCrop(32, scale=(0.5, 2.0)),
                                       Compose([RandomScaleCrop(48), RandomHorizontalFlip()])])
def test_geometric_transforms_keep_image_and_mask_aligned(transform, rng):
    for _ in range(5):
        image, mask = _coded_pair(rng)
        out_image, out_mask = transform(image, mask, rng)
        assert out_image.shape[:2] == out_mask.shape
        np.testing.assert_array_equal(out_image[..., 0] > 0.5, out_mask > 0.5)
        assert set(np.unique(out_mask)) <= {0.0, 1.0}


def test_flip_mirrors_and_jitter_leaves_mask(rng):
    image, mask = _coded_pair(rng)
    flipped, fmask = RandomHorizontalFlip(p=1.0)(image, mask, rng)
    np.testing.assert_array_equal(flipped, image[:, ::-1])
    np.testing.assert_array_equal(fmask, mask[:, ::-1])
    jittered, jmask = ColorJitter(0.3, 0.3, 0.3)(image, mask, rng)
    assert jmask is mask and jittered.shape == image.shape
    assert 0 <= jittered.min() and jittered.max() <= 1 and not np.allclose(jittered, image)


def test_resize_bilinear_matches_torch(rng):
    torch = pytest.importorskip("torch")
    a = rng.random((13, 17, 3)).astype(np.float32)
    for size in ((26, 34), (7, 9), (20, 11)):
        ref = torch.nn.functional.interpolate(torch.from_numpy(np.transpose(a, (2, 0, 1)))[None], size=size,
                                              mode="bilinear", align_corners=False)[0].numpy()
        np.testing.assert_allclose(resize_bilinear(a, size), np.transpose(ref, (1, 2, 0)), atol=1e-5)


def test_resize_window_is_the_window_of_the_resize(rng):
    for shape, size in (((13, 17, 3), (26, 34)), ((13, 17), (7, 9)), ((20, 20, 3), (20, 20)), ((9, 30), (31, 12))):
        a = rng.random(shape).astype(np.float32)
        full = resize_bilinear(a, size)
        for rows, cols in ((slice(0, 3), slice(2, 5)), (slice(1, None), slice(None)), (slice(None), slice(4, 6))):
            np.testing.assert_array_equal(resize_bilinear(a, size, rows, cols), full[rows, cols])


@pytest.mark.parametrize("shape", [(40, 40), (37, 53), (90, 25)])
@pytest.mark.parametrize("scale", [(0.3, 0.6), (0.75, 1.25), (1.5, 2.5)])
def test_scale_crop_is_resize_pad_crop(shape, scale, rng):
    """RandomScaleCrop computes only the resized pixels its crop keeps: bit for bit the resize of the whole pair,
    padded at the random side and cropped, with the same random draws."""
    def reference(image, mask, g, size):          # the plain algorithm, step by step
        H, W = mask.shape
        s = g.uniform(*scale) * size / max(H, W)
        h, w = max(1, round(H * s)), max(1, round(W * s))
        image, mask = resize_bilinear(image, (h, w)), (resize_bilinear(mask, (h, w)) > 0.5).astype(np.float32)
        ph, pw = max(0, size - h), max(0, size - w)
        if ph or pw:
            top, left = int(g.integers(0, ph + 1)), int(g.integers(0, pw + 1))
            image = np.pad(image, ((top, ph - top), (left, pw - left), (0, 0)))
            mask = np.pad(mask, ((top, ph - top), (left, pw - left)))
        y, x = int(g.integers(0, mask.shape[0] - size + 1)), int(g.integers(0, mask.shape[1] - size + 1))
        return image[y:y + size, x:x + size], mask[y:y + size, x:x + size]

    for seed in range(6):
        image = rng.random(shape + (3,)).astype(np.float32)
        mask = (rng.random(shape) > 0.5).astype(np.float32)
        g1, g2 = np.random.default_rng(seed), np.random.default_rng(seed)
        got = RandomScaleCrop(32, scale)(image, mask, g1)
        want = reference(image, mask, g2, 32)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        assert got[0].dtype == got[1].dtype == np.float32
        assert g1.bit_generator.state == g2.bit_generator.state


def test_denormalize_inverts_normalisation():
    raw, _ = SyntheticShapes(1, size=20, seed=0, normalize=False)[0]
    img, _ = SyntheticShapes(1, size=20, seed=0)[0]
    np.testing.assert_allclose(denormalize(img), np.transpose(raw, (1, 2, 0)), atol=1e-5)


# -- DataLoader -------------------------------------------------------------------------------------------
def test_dataloader_batches_and_order():
    ds = SyntheticShapes(10, size=16, seed=0)
    batches = list(DataLoader(ds, batch_size=4))
    assert [b[0].shape for b in batches] == [(4, 3, 16, 16), (4, 3, 16, 16), (2, 3, 16, 16)]
    assert batches[0][1].shape == (4, 1, 16, 16) and batches[0][0].dtype == np.float32
    np.testing.assert_array_equal(batches[1][0][0], ds[4][0])
    assert len(DataLoader(ds, batch_size=4, drop_last=True)) == 2
    assert len(list(DataLoader(ds, batch_size=4, drop_last=True))) == 2

    a = DataLoader(ds, 3, shuffle=True, rng=np.random.default_rng(5))
    b = DataLoader(ds, 3, shuffle=True, rng=np.random.default_rng(5))
    order = a.epoch_order()
    assert sorted(order) == list(range(10)) and not np.array_equal(order, np.arange(10))
    np.testing.assert_array_equal(order, b.epoch_order())
    skipped = list(a.batches(order, start=2))
    np.testing.assert_array_equal(skipped[0][0][0], ds[int(order[6])][0])
    with pytest.raises(ValueError, match="explicit rng"):
        DataLoader(ds, 3, shuffle=True)
