"""``nn.no_grad``: inference that keeps nothing for backward gives the same numbers and holds no activations."""
import threading

import numpy as np
import pytest

from minideeplab import nn
from minideeplab.models import DeepLabConfig, build_deeplab
from minideeplab.nn.fused import BNReLUConv1x1
from minideeplab.nn.module import Parameter


def small(os_=16, dtype=np.float64):
    return build_deeplab(DeepLabConfig.small(output_stride=os_), rng=np.random.default_rng(0), dtype=dtype)


def cached_arrays(model, xp=np):
    """Arrays that the modules of ``model`` hold in attributes, other than parameters, buffers, index arrays and
    interpolation matrices: what forward kept for backward. Looks into tuples, lists and the helper objects
    (fused heads, a dense block's shared statistics) too. Returns (module class, attribute, nbytes) triples."""
    found = []

    def visit(owner, name, value, depth=0):
        if isinstance(value, xp.ndarray):
            found.append((owner, name, value.nbytes))
        elif isinstance(value, (tuple, list)):
            for v in value:
                visit(owner, name, v, depth)
        elif depth < 2 and (isinstance(value, BNReLUConv1x1) or hasattr(value, "centered")) \
                and not isinstance(value, nn.Module):
            for k, v in vars(value).items():
                if k not in ("norm", "conv", "post"):
                    visit(owner, f"{name}.{k}", v, depth + 1)

    for m in model.modules():
        own = {id(b) for b in m._buffers.values()}
        for name, value in vars(m).items():
            if name.startswith("_") or name in ("index_arrays", "A_h", "A_w") or isinstance(value, Parameter):
                continue
            if id(value) not in own:
                visit(type(m).__name__, name, value)
    return found


@pytest.mark.parametrize("os_", [8, 32])
def test_no_grad_forward_is_the_same_and_keeps_nothing(os_):
    model = small(os_).eval()
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64))
    expected = model(x)
    held = sum(n for *_, n in cached_arrays(model))
    assert held > 10 * x.nbytes          # the plain eval forward keeps its activations (for an eval backward)
    with nn.no_grad():
        out = model(x)
    np.testing.assert_array_equal(out, expected)
    assert cached_arrays(model) == []
    with pytest.raises(RuntimeError, match="before forward"):
        model.backward(np.ones_like(out))
    # and after the context, forward keeps its caches again: backward works
    model(x)
    assert model.backward(np.ones_like(out)).shape == x.shape


def test_no_grad_in_training_mode_updates_running_statistics_as_usual():
    a, b = small(), small()
    x = np.random.default_rng(2).standard_normal((2, 3, 64, 64))
    out_a = a.train()(x)
    with nn.no_grad():
        out_b = b.train()(x)
    np.testing.assert_allclose(out_b, out_a, rtol=0, atol=1e-12)   # dropout draws from the same seeded rng
    for (name, ra), (_, rb) in zip(a.named_buffers(), b.named_buffers()):
        np.testing.assert_array_equal(rb, ra, err_msg=name)
    assert cached_arrays(b) == []


def test_no_grad_restores_the_mode_and_is_per_thread():
    assert nn.is_grad_enabled()
    seen = {}
    with pytest.raises(KeyError):
        with nn.no_grad():
            assert not nn.is_grad_enabled()
            worker = threading.Thread(target=lambda: seen.setdefault("other", nn.is_grad_enabled()))
            worker.start()
            worker.join()
            raise KeyError("leaves the context")
    assert nn.is_grad_enabled()
    assert seen["other"] is True


def test_a_fresh_parameter_gradient_reads_as_zeros_and_accumulates():
    p = Parameter(np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(p.grad, np.zeros((2, 3)))
    q = Parameter(np.ones(4))
    q.accumulate(np.full(4, 2.0))      # the first gradient is copied in
    q.accumulate(np.full(4, 1.0))
    np.testing.assert_array_equal(q.grad, np.full(4, 3.0))


def test_predict_runs_under_no_grad():
    model = small().eval()
    x = np.random.default_rng(3).standard_normal((2, 3, 64, 64))
    proba = model.predict_proba(x)
    assert cached_arrays(model) == []
    np.testing.assert_allclose(proba, nn.sigmoid(model(x)), rtol=0, atol=1e-15)
    assert nn.is_grad_enabled()
