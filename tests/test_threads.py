"""``nn.threads``: inference with the batch split over threads gives the plain forward's numbers."""
import numpy as np
import pytest

from minideeplab import nn
from minideeplab.models import DeepLabConfig, build_deeplab
from minideeplab.nn import threads

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
    expected = model(x)                       # grad enabled: never split
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
        assert threads.inference_threads(model, x) == 2
        out = model(x)
    np.testing.assert_allclose(out, model(x), rtol=1e-4, atol=1e-5)


def test_no_split_where_it_would_change_the_result_or_cannot_help(two_blas_threads, monkeypatch):
    model = small().eval()
    x = np.random.default_rng(5).standard_normal((2, 3, 32, 32))
    calls = count_splits(monkeypatch)
    model(x)                                  # grad enabled
    with nn.no_grad():
        model(x[:1])                          # one image
        model.head.aspp.project.bn.train()    # a batch norm using batch statistics needs the whole batch
        model(x)
        model.eval()
        with threadpoolctl.threadpool_limits(1, user_api="blas"):
            model(x)                          # one BLAS thread: one part
        assert threads.inference_threads(model, x.view(type("Sub", (np.ndarray,), {}))) == 1   # only plain NumPy
    assert calls == []


def test_an_error_in_a_part_is_raised_and_the_blas_threads_restored(two_blas_threads):
    model = small().eval()
    x = np.full((2, 3, 32, 32), np.nan)
    model.backbone.features.conv0.weight.data = model.backbone.features.conv0.weight.data.astype(np.float32)
    with nn.no_grad(), pytest.raises(TypeError, match="Conv2d"):
        model(x)
    assert threads.blas_threads() == 2


def test_no_split_with_fewer_images_than_blas_threads_or_when_switched_off(two_blas_threads, monkeypatch):
    model = small().eval()
    x = np.random.default_rng(10).standard_normal((2, 3, 32, 32))
    with nn.no_grad():
        assert threads.inference_threads(model, x) == 2
        with threadpoolctl.threadpool_limits(3, user_api="blas"):
            if threads.blas_threads() == 3:
                assert threads.inference_threads(model, x) == 1          # the BLAS keeps its three threads
                assert threads.inference_threads(model, np.concatenate([x, x])) == 3
        monkeypatch.setattr(threads, "enabled", False)
        assert threads.inference_threads(model, x) == 1
