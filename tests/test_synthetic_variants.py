"""The 'fine' and 'context' variants of SyntheticShapes: deterministic, well-formed, and built as documented."""
import numpy as np
import pytest

from minideeplab.data import SyntheticShapes
from minideeplab.data.synthetic_variants import fine_mask, render_context
from minideeplab.train import TrainConfig, build_datasets


@pytest.mark.parametrize("variant", ["fine", "context"])
def test_items_are_deterministic_and_well_formed(variant):
    a = SyntheticShapes(6, 48, seed=3, split=1, variant=variant)
    b = SyntheticShapes(6, 48, seed=3, split=1, variant=variant)
    for i in reversed(range(6)):             # any order
        (xa, ma), (xb, mb) = a[i], b[i]
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ma, mb)
        assert xa.shape == (3, 48, 48) and ma.shape == (1, 48, 48) and xa.dtype == ma.dtype == np.float32
        assert set(np.unique(ma)) <= {0.0, 1.0}
    other = SyntheticShapes(6, 48, seed=4, split=1, variant=variant)
    assert any(not np.array_equal(a.raw(i)[0], other.raw(i)[0]) for i in range(6))
    assert "variant" in repr(a)


def test_default_is_unchanged_by_the_variant_argument():
    a, b = SyntheticShapes(3, 40, seed=2), SyntheticShapes(3, 40, seed=2, variant="default")
    for i in range(3):
        np.testing.assert_array_equal(a[i][0], b[i][0])
    with pytest.raises(ValueError, match="variant must be one of"):
        SyntheticShapes(3, 40, variant="thin")


def test_fine_structures_are_thin():
    size = 96
    coords = (np.arange(size) + 0.5) / size
    u, v = np.meshgrid(coords, coords)
    rng = np.random.default_rng(0)
    for _ in range(20):
        # a line is at most 0.9 of the side long and 3.5 % wide: its area is at most that rectangle's (plus the
        # pixels its edges cut)
        area = fine_mask(rng, "line", u, v).sum()
        assert area <= 0.9 * 0.035 * size ** 2 + 2 * (0.9 + 0.035) * size, area
    ds = SyntheticShapes(30, 96, seed=0, variant="fine")
    fractions = [ds.raw(i)[1].mean() for i in range(30)]
    assert 0 < np.mean(fractions) < 0.1            # small, thin foreground


def test_context_labels_follow_the_frame_colour():
    size = 64
    for i in range(12):
        image, mask = render_context(np.random.default_rng([5, i]), size, noise=0.0)
        f = round(0.06 * size)
        cue = image[0, 0]
        frame = np.zeros((size, size), bool)
        frame[:f], frame[-f:], frame[:, :f], frame[:, -f:] = True, True, True, True
        np.testing.assert_allclose(image[frame], np.broadcast_to(cue, image[frame].shape), atol=1e-6)
        assert not mask[frame].any()
        is_cue = np.abs(image - cue).max(axis=-1) < 1e-6
        # foreground = the pixels of the frame's colour inside the frame, and nothing else
        np.testing.assert_array_equal(mask.astype(bool), is_cue & ~frame)


def test_train_config_names_the_variants():
    cfg = TrainConfig(data="shapes-context", train_size=2, val_size=2, image_size=32).validate()
    train, val = build_datasets(cfg, np.random.default_rng(0))
    assert train.variant == val.variant == "context"
    with pytest.raises(ValueError, match="the synthetic sets are"):
        TrainConfig(data="shapes-thin").validate()
