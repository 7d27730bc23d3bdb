"""``nn.threads``: a forward and backward with the batch split over threads give the plain ones' numbers."""
import threading

import numpy as np
import pytest

from minideeplab import nn
from minideeplab.losses import BCEWithLogitsLoss
from minideeplab.models import DeepLabConfig, build_deeplab, set_fused
from minideeplab.nn import threads
from minideeplab.profiler import TypeProfiler

threadpoolctl = pytest.importorskip("threadpoolctl")


def small(os_=16, dtype=np.float64, **kw):
    return build_deeplab(DeepLabConfig.small(output_stride=os_, **kw), rng=np.random.default_rng(0), dtype=dtype)


@pytest.fixture
def two_blas_threads():
    if threads.blas_threads() < 1 or not threads._blas_controller():
        pytest.skip("threadpoolctl cannot control this BLAS")
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        yield


def count_splits(monkeypatch):
    calls = []
    original = threads.split_forward

    def spy(model, x, parts):
        calls.append((x.shape[0], parts))
        return original(model, x, parts)
    monkeypatch.setattr("minideeplab.models.deeplabv3.split_forward", spy)
    return calls


@pytest.mark.parametrize("os_", [8, 32])
@pytest.mark.parametrize("batch", [2, 3])
def test_split_forward_equals_the_plain_forward(two_blas_threads, monkeypatch, os_, batch):
    model = small(os_).eval()
    x = np.random.default_rng(3).standard_normal((batch, 3, 48, 64))
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        expected = model(x)                   # one BLAS thread: not split
    calls = count_splits(monkeypatch)
    for _ in range(3):                        # repeated: the two threads run the same modules at once
        with nn.no_grad():
            out = model(x)
        np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    assert calls == [(batch, 2)] * 3
    assert threads.blas_threads() == 2        # restored after the split


def test_split_forward_float32_to_rounding(two_blas_threads):
    model = small(16, dtype=np.float32).eval()
    x = np.random.default_rng(4).standard_normal((4, 3, 64, 64), dtype=np.float32)
    with nn.no_grad():
        assert threads.split_parts(model, x) == 2
        out = model(x)
    np.testing.assert_allclose(out, model(x), rtol=1e-4, atol=1e-5)


def test_no_split_where_it_would_change_the_result_or_cannot_help(two_blas_threads, monkeypatch):
    model = small().eval()
    x = np.random.default_rng(5).standard_normal((2, 3, 32, 32))
    calls = count_splits(monkeypatch)
    with nn.no_grad():
        model(x[:1])                          # one image
        model.head.aspp.project.bn.train()    # a batch norm using batch statistics needs the whole batch
        model(x)
        model.eval()
        with threadpoolctl.threadpool_limits(1, user_api="blas"):
            model(x)                          # one BLAS thread: one part
        assert threads.split_parts(model, x.view(type("Sub", (np.ndarray,), {}))) == 1   # only plain NumPy
    assert calls == []


def test_an_error_in_a_part_is_raised_and_the_blas_threads_restored(two_blas_threads):
    model = small().eval()
    x = np.full((2, 3, 32, 32), np.nan)
    model.backbone.features.conv0.weight.data = model.backbone.features.conv0.weight.data.astype(np.float32)
    with nn.no_grad(), pytest.raises(TypeError, match="Conv2d"):
        model(x)
    assert threads.blas_threads() == 2


# -- training: replicas, batch statistics summed over the parts, gradients added under a lock ---------------------
def train_steps(blas, steps=2, batch=2, os_=16, prepare=None, lr=0.1):
    """``steps`` SGD steps of the small model (float64, dropout on) with the BLAS at ``blas`` threads; returns the
    model and each step's (logits, input gradient, whether the step was split)."""
    model = small(os_)
    if prepare is not None:
        prepare(model)
    rng = np.random.default_rng(7)
    x, target = rng.standard_normal((batch, 3, 48, 64)), (rng.random((batch, 1, 48, 64)) < 0.3).astype(np.float64)
    loss, seen = BCEWithLogitsLoss(), []
    with threadpoolctl.threadpool_limits(blas, user_api="blas"):
        for _ in range(steps):
            model.zero_grad()
            logits = model(x)
            loss(logits, target)
            dx = model.backward(loss.backward())
            seen.append((logits, dx, model.split_run is not None))
            for p in model.parameters():
                p.data -= lr * p.grad
    return model, seen


def assert_same_training(split, plain, rtol=1e-9):
    (a, steps_a), (b, steps_b) = split, plain
    assert [s for *_, s in steps_a] == [True] * len(steps_a) and not any(s for *_, s in steps_b)
    for (la, da, _), (lb, db, _) in zip(steps_a, steps_b):
        np.testing.assert_allclose(la, lb, rtol=0, atol=1e-12 * np.abs(lb).max())
        np.testing.assert_allclose(da, db, rtol=0, atol=1e-12 * np.abs(db).max())
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_allclose(p.grad, q.grad, rtol=0, atol=rtol * np.abs(q.grad).max(), err_msg=name)
        np.testing.assert_allclose(p.data, q.data, rtol=0, atol=1e-12, err_msg=name)
    for (name, u), (_, v) in zip(a.named_buffers(), b.named_buffers()):
        np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-12, err_msg=name)     # running statistics, counts


@pytest.mark.parametrize("os_, batch", [(16, 2), (8, 3), (32, 4)])
def test_split_training_steps_equal_the_plain_ones(two_blas_threads, os_, batch):
    # two SGD steps: logits, input gradients, every parameter gradient and value, running statistics and
    # num_batches_tracked (updated once, not once per part), dropout masks drawn once for the whole batch
    assert_same_training(train_steps(2, batch=batch, os_=os_), train_steps(1, batch=batch, os_=os_))


def test_split_training_unfused_heads_and_a_frozen_batch_norm(two_blas_threads):
    def prepare(model):
        set_fused(model, False)
        model.train()
        model.backbone.features.denseblock2.denselayer1.norm1.eval()   # running statistics in a training step
    split, plain = train_steps(2, prepare=prepare), train_steps(1, prepare=prepare)
    assert_same_training(split, plain)


def test_split_training_is_deterministic(two_blas_threads):
    a, _ = train_steps(2, steps=3)
    b, _ = train_steps(2, steps=3)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(p.grad, q.grad, err_msg=name)   # two partial gradients: same sum either order


def test_split_training_needs_two_blas_threads_and_two_images(two_blas_threads):
    model = small()
    x = np.random.default_rng(8).standard_normal((2, 3, 32, 32))
    with threadpoolctl.threadpool_limits(3, user_api="blas"):
        if threads.blas_threads() == 3:
            assert threads.split_parts(model, x) == 1          # more parts would sum gradients in varying order
        assert threads.split_parts(model.eval(), x) == 1 or not nn.is_grad_enabled()
    assert threads.split_parts(model.train(), x) == 2
    assert threads.split_parts(model, x[:1]) == 1
    with pytest.raises(ValueError, match="image-pooling"):      # still the clear error for a batch of one
        model(x[:1])
    with nn.no_grad():
        assert threads.split_parts(model, x) == 1             # training mode under no_grad: never split


def test_an_error_in_one_part_is_raised_and_does_not_hang(two_blas_threads, monkeypatch):
    model = small()
    x = np.random.default_rng(9).standard_normal((2, 3, 32, 32))
    original = nn.AvgPool2d.forward

    def fails_in_part_1(self, x):
        if threads._inside.rank == 1:
            raise FloatingPointError("part 1 failed")
        return original(self, x)
    monkeypatch.setattr(nn.AvgPool2d, "forward", fails_in_part_1)
    raised = []

    def step():
        try:
            with threadpoolctl.threadpool_limits(2, user_api="blas"):
                model(x)
        except Exception as e:        # noqa: BLE001 (kept for the assertion below)
            raised.append(e)
    runner = threading.Thread(target=step, daemon=True)
    runner.start()
    runner.join(120)
    assert not runner.is_alive(), "a part waiting at a batch norm for the part that failed was never released"
    assert len(raised) == 1 and isinstance(raised[0], FloatingPointError) and "part 1" in str(raised[0])
    monkeypatch.setattr(nn.AvgPool2d, "forward", original)
    model.zero_grad()
    model.backward(np.ones_like(model(x)))                     # and the next step works
    assert threads.blas_threads() == 2


def test_replicas_share_parameters_and_buffers_but_not_caches_or_wrapped_methods(two_blas_threads):
    model = small()
    profiler = TypeProfiler(model).attach()
    replica = threads.replicate(model)
    profiler.detach()
    pairs = list(zip(model.modules(), replica.modules()))
    assert all(type(m) is type(r) and m is not r for m, r in pairs)
    for m, r in pairs:
        assert list(m._parameters.values()) == list(r._parameters.values())      # the same Parameter objects
        assert all(u is v for u, v in zip(m._buffers.values(), r._buffers.values()))
        assert "forward" not in vars(r)                                        # the profiler's wrapper left out
        head = getattr(r, "fused_head", None)
        if head is not None:
            assert head.norm is next(r.children()) and head is not m.fused_head


def test_the_switches_turn_the_split_off(two_blas_threads, monkeypatch):
    model = small()
    x = np.random.default_rng(10).standard_normal((2, 3, 32, 32))
    monkeypatch.setattr(threads, "split_training", False)
    assert threads.split_parts(model, x) == 1
    monkeypatch.setattr(threads, "split_inference", False)
    with nn.no_grad():
        assert threads.split_parts(model.eval(), x) == 1
    monkeypatch.setattr(threads, "split_inference", True)
    with nn.no_grad():
        assert threads.split_parts(model, x) == 2
