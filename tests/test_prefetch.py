"""``DataLoader(prefetch=True)``: the same batches as without, and the augmentation Generator where a pass without
prefetching leaves it at every batch, so checkpoints and resume are unchanged."""
import time

import numpy as np
import pytest

from minideeplab.data import DataLoader, Subset, SyntheticShapes, train_transform


def _pass(dataset_rng_seed, prefetch, start=0, subset=False):
    """The batches of one pass and the augmentation Generator's state seen as each is handed out."""
    rng = np.random.default_rng(dataset_rng_seed)
    data = SyntheticShapes(10, 32, seed=2, transform=train_transform(32), rng=rng)
    if subset:
        data = Subset(data, [9, 3, 4, 0, 7, 1, 2])
    loader = DataLoader(data, 3, shuffle=True, rng=np.random.default_rng(5), prefetch=prefetch)
    order = loader.epoch_order()
    out = []
    for images, masks in loader.batches(order, start):
        time.sleep(0.05)              # a training step: the thread makes the next batch meanwhile
        out.append((images, masks, rng.bit_generator.state))
    return out, rng.bit_generator.state


@pytest.mark.parametrize("subset", [False, True])
@pytest.mark.parametrize("start", [0, 2])
def test_prefetching_gives_the_same_batches_and_generator_states(subset, start):
    plain, plain_end = _pass(1, False, start, subset)
    ahead, ahead_end = _pass(1, True, start, subset)
    assert len(plain) == len(ahead) == (4 if not subset else 3) - start
    for (a, b, sa), (c, d, sc) in zip(plain, ahead):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
        assert sa == sc
    assert plain_end == ahead_end


def test_prefetching_a_dataset_without_item_loads_as_without():
    items = [(np.full((3, 4, 4), i, np.float32), np.zeros((1, 4, 4), np.float32)) for i in range(5)]
    loader = DataLoader(items, 2, prefetch=True)
    assert [b[0][:, 0, 0, 0].tolist() for b in loader] == [[0, 1], [2, 3], [4]]


def test_prefetching_stops_cleanly_and_reports_errors():
    data = SyntheticShapes(9, 16, transform=train_transform(16), rng=np.random.default_rng(0))
    loader = DataLoader(data, 3, prefetch=True)
    batches = iter(loader)
    next(batches)
    batches.close()                                   # the thread's batch in flight is awaited, nothing hangs

    class Broken(SyntheticShapes):
        def raw(self, index):
            if index == 4:
                raise ValueError("item 4 is corrupt")
            return super().raw(index)
    loader = DataLoader(Broken(9, 16, transform=train_transform(16), rng=np.random.default_rng(0)), 3,
                        prefetch=True)
    batches = iter(loader)
    next(batches)
    with pytest.raises(ValueError, match="item 4 is corrupt"):
        next(batches)
