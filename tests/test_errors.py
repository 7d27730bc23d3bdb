"""Bad input gives a ValueError/TypeError that names the layer and says what was expected and what came."""
import numpy as np
import pytest

from minideeplab import nn


def f32(*shape):
    return np.zeros(shape, dtype=np.float32)


FOUR_D = [  # layers that need (N, C, H, W): (name, module factory, good input)
    ("Conv2d", lambda: nn.Conv2d(3, 4, 3, padding=1, rng=np.random.default_rng(0)), f32(2, 3, 5, 5)),
    ("BatchNorm2d", lambda: nn.BatchNorm2d(3), f32(2, 3, 5, 5)),
    ("MaxPool2d", lambda: nn.MaxPool2d(2), f32(2, 3, 4, 4)),
    ("AvgPool2d", lambda: nn.AvgPool2d(2), f32(2, 3, 4, 4)),
    ("AdaptiveAvgPool2d", lambda: nn.AdaptiveAvgPool2d(1), f32(2, 3, 4, 4)),
    ("Upsample", lambda: nn.Upsample(size=(6, 6)), f32(2, 3, 4, 4)),
    ("Concat", lambda: nn.Concat(), f32(2, 3, 4, 4)),
]
IDS = [name for name, _, _ in FOUR_D]


@pytest.mark.parametrize("name,make,good", FOUR_D, ids=IDS)
@pytest.mark.parametrize("shape", [(3, 5, 5), (2, 3, 5, 5, 1), (15,)], ids=["3d", "5d", "1d"])
def test_wrong_ndim(name, make, good, shape):
    bad = np.zeros(shape, dtype=np.float32)
    pattern = rf"{name}.*expected input of shape \(N, C, H, W\), got shape {_shape_re(shape)} \({len(shape)}-D\)"
    with pytest.raises(ValueError, match=pattern):
        make()(bad)


@pytest.mark.parametrize("name,make,good", FOUR_D, ids=IDS)
@pytest.mark.parametrize("dtype", [np.int64, np.uint8, np.bool_], ids=["int64", "uint8", "bool"])
def test_non_float_dtype(name, make, good, dtype):
    with pytest.raises(TypeError, match=rf"{name}.*expected a floating-point array .*got dtype {np.dtype(dtype)}"):
        make()(good.astype(dtype))


@pytest.mark.parametrize("layer", [nn.ReLU, nn.Sigmoid, lambda: nn.Dropout(0.5, rng=np.random.default_rng(0))],
                         ids=["ReLU", "Sigmoid", "Dropout"])
def test_elementwise_non_float_dtype(layer):
    module = layer()
    name = type(module).__name__
    with pytest.raises(TypeError, match=rf"{name}: expected a floating-point array, got int64"):
        module(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(TypeError, match=rf"{name}: expected a floating-point array, got list"):
        module([1.0, 2.0])


@pytest.mark.parametrize("name,make", [("Conv2d", lambda: nn.Conv2d(3, 4, 3, rng=np.random.default_rng(0))),
                                        ("BatchNorm2d", lambda: nn.BatchNorm2d(3))], ids=["Conv2d", "BatchNorm2d"])
def test_wrong_channel_count(name, make):
    with pytest.raises(ValueError, match=rf"{name}: expected 3 input channels, got 4 \(input shape \(2, 4, 5, 5\)\)"):
        make()(f32(2, 4, 5, 5))


@pytest.mark.parametrize("name,make", [("Conv2d", lambda: nn.Conv2d(3, 4, 3, rng=np.random.default_rng(0))),
                                        ("BatchNorm2d", lambda: nn.BatchNorm2d(3))], ids=["Conv2d", "BatchNorm2d"])
def test_dtype_mismatch_with_parameters(name, make):
    with pytest.raises(TypeError, match=rf"{name}: input dtype float64 does not match parameter dtype float32"):
        make()(np.zeros((2, 3, 5, 5)))
    module = make().double()
    with pytest.raises(TypeError, match=rf"{name}: input dtype float32 does not match parameter dtype float64"):
        module(f32(2, 3, 5, 5))


def test_not_an_array():
    with pytest.raises(TypeError, match="Conv2d: expected an array, got list"):
        nn.Conv2d(1, 1, 1, rng=np.random.default_rng(0))([[1.0]])


@pytest.mark.parametrize("kwargs,shape", [
    ({"kernel_size": 3}, (1, 3, 2, 2)),
    ({"kernel_size": 3, "dilation": 6, "padding": 2}, (1, 3, 8, 8)),
    ({"kernel_size": (1, 5)}, (1, 3, 8, 4)),
])
def test_conv_input_too_small_for_kernel(kwargs, shape):
    conv = nn.Conv2d(3, 2, rng=np.random.default_rng(0), **kwargs)
    with pytest.raises(ValueError, match=rf"Conv2d: input {_shape_re(shape)} is too small for kernel"):
        conv(f32(*shape))


@pytest.mark.parametrize("pool", [nn.MaxPool2d, nn.AvgPool2d], ids=["MaxPool2d", "AvgPool2d"])
def test_pool_input_too_small_and_bad_padding(pool):
    name = pool.__name__
    with pytest.raises(ValueError, match=rf"{name}: input \(1, 2, 2, 5\) is smaller than the kernel \(3, 3\)"):
        pool(3)(f32(1, 2, 2, 5))
    with pytest.raises(ValueError, match=rf"{name}: padding \(2, 2\) must be at most half the kernel \(3, 3\)"):
        pool(3, 1, 2)


def test_batchnorm_single_value_per_channel_in_training():
    bn = nn.BatchNorm2d(3)
    with pytest.raises(ValueError, match=r"BatchNorm2d: training needs more than one value per channel, got input "
                                         r"shape \(1, 3, 1, 1\)"):
        bn(f32(1, 3, 1, 1))
    out = bn.eval()(np.ones((1, 3, 1, 1), dtype=np.float32))   # eval uses running statistics: fine
    assert np.all(np.isfinite(out))


def test_constructor_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"Conv2d: kernel_size, stride, dilation must be >= 1 and padding >= 0"):
        nn.Conv2d(1, 1, 0, rng=rng)
    with pytest.raises(ValueError, match=r"Conv2d: .*padding >= 0, got .* p=\(-1, -1\)"):
        nn.Conv2d(1, 1, 3, padding=-1, rng=rng)
    with pytest.raises(ValueError, match=r"Conv2d: .* s=\(0, 1\)"):
        nn.Conv2d(1, 1, 3, stride=(0, 1), rng=rng)
    with pytest.raises(TypeError, match=r"kernel_size must be an int or a pair of ints, got '3'"):
        nn.Conv2d(1, 1, "3", rng=rng)
    with pytest.raises(TypeError, match=r"dilation must be an int or a pair of ints, got \(1, 2, 3\)"):
        nn.Conv2d(1, 1, 3, dilation=(1, 2, 3), rng=rng)
    with pytest.raises(ValueError, match=r"Dropout: p must be in \[0, 1\), got 1"):
        nn.Dropout(1)
    with pytest.raises(ValueError, match=r"AdaptiveAvgPool2d: only output_size 1 is supported, got 2"):
        nn.AdaptiveAvgPool2d(2)
    with pytest.raises(ValueError, match=r"Upsample: only mode='bilinear' is implemented, got 'nearest'"):
        nn.Upsample(size=4, mode="nearest")
    with pytest.raises(ValueError, match="Upsample: give exactly one of size and scale_factor"):
        nn.Upsample(size=4, scale_factor=2)
    with pytest.raises(ValueError, match="Upsample: give exactly one of size and scale_factor"):
        nn.Upsample()


def test_upsample_empty_output():
    with pytest.raises(ValueError, match=r"Upsample: output size \(0, 1\) from input \(1, 2, 3, 5\) is empty"):
        nn.Upsample(scale_factor=0.3)(f32(1, 2, 3, 5))


def test_concat_incompatible_inputs():
    cat = nn.Concat()
    with pytest.raises(ValueError, match=r"Concat: input 1 has shape \(2, 3, 4, 5\), incompatible with input 0 "
                                         r"\(2, 3, 4, 4\) outside dim 1"):
        cat(f32(2, 3, 4, 4), f32(2, 3, 4, 5))
    with pytest.raises(ValueError, match="Concat: needs at least one input"):
        cat()
    with pytest.raises(ValueError, match=r"Concat \(input 1\): expected input of shape \(N, C, H, W\)"):
        cat(f32(2, 3, 4, 4), f32(3, 4, 4))


def _shape_re(shape) -> str:
    """A regex matching ``str(tuple(shape))`` literally."""
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")
