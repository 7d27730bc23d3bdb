"""The backend: the arrays decide NumPy or CuPy; moving between devices; clear errors for bad devices."""
import numpy as np
import pytest

from minideeplab import backend, nn
from minideeplab.backend import check_device, cuda_available, device_of, get_array_module, to_device, to_numpy


def test_get_array_module_follows_the_arrays(xp, device):
    a = xp.zeros(3)
    assert get_array_module(a) is xp
    assert get_array_module(np.zeros(2), a) is xp          # any CuPy array makes it CuPy
    assert get_array_module() is np
    assert get_array_module(1.0, [1, 2]) is np
    assert device_of(a) == device


def test_to_numpy_and_to_device_round_trip(xp, device):
    a = np.arange(6.0).reshape(2, 3)
    on = to_device(a, device)
    assert type(on) is xp.ndarray
    back = to_numpy(on)
    assert type(back) is np.ndarray
    np.testing.assert_array_equal(back, a)
    assert to_device(a, "cpu") is a                           # already there: no copy
    assert type(to_numpy(3.0)) is np.ndarray


def test_cuda_available_is_a_bool():
    assert cuda_available() in (True, False)


def test_bad_device_names():
    with pytest.raises(ValueError, match=r"device must be one of \('cpu', 'cuda'\), got 'gpu'"):
        check_device("gpu")
    with pytest.raises(ValueError, match="device must be one of"):
        to_device(np.zeros(1), "tpu")


@pytest.mark.skipif(cuda_available(), reason="a GPU is visible")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="device 'cuda' requested but CuPy is not installed or no GPU is visible"):
        nn.Conv2d(1, 1, 1, rng=np.random.default_rng(0)).to("cuda")


def test_module_computes_where_its_parameters_live(xp, device, rng):
    conv = nn.Conv2d(2, 3, 3, rng=rng).to(device)
    out = conv(xp.asarray(rng.standard_normal((1, 2, 5, 5)).astype(np.float32)))
    assert type(out) is xp.ndarray
    assert type(conv.backward(xp.ones_like(out))) is xp.ndarray
    assert type(conv.weight.grad) is xp.ndarray


def test_synchronize_is_safe_everywhere(xp):
    backend.synchronize()
    backend.synchronize(xp.zeros(1))


def test_scatter_add_adds_every_value_of_a_repeated_index(xp):
    target = xp.asarray([10.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=np.float32)
    backend.scatter_add(target, xp.asarray([1, 0, 1, 5, 1]), xp.asarray([1.0, 2.0, 3.0, 4.0, 5.0], dtype=np.float32))
    np.testing.assert_array_equal(to_numpy(target), [12.0, 9.0, 0.0, 0.0, 0.0, 4.0])


def test_scatter_add_uses_cupyx_scatter_add_where_ufuncs_have_no_at(xp, monkeypatch):
    """CuPy before 12 (cupy-cuda11x) has no ``cupy.add.at``: the max pool's backward then goes through
    ``cupyx.scatter_add``. On a GPU the real one runs; on the CPU a stand-in checks that it is the one called."""
    import sys
    import types
    calls = []
    if xp is np:
        def stand_in(a, index, values):
            calls.append(index)
            np.add.at(a, index, values)
        monkeypatch.setitem(sys.modules, "cupyx", types.SimpleNamespace(scatter_add=stand_in))
    else:
        import cupyx
        if not hasattr(cupyx, "scatter_add"):
            pytest.skip("this CuPy has no cupyx.scatter_add (it has cupy.add.at, which the first test checks)")
    monkeypatch.setattr(backend, "get_array_module", lambda *a: types.SimpleNamespace(add=object()))
    target = xp.zeros(4, dtype=np.float32)
    backend.scatter_add(target, xp.asarray([3, 3, 0]), xp.asarray([1.0, 2.0, 4.0], dtype=np.float32))
    np.testing.assert_array_equal(to_numpy(target), [4.0, 0.0, 0.0, 3.0])
    assert len(calls) == (1 if xp is np else 0)
