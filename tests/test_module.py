"""The Module protocol: names, state, modes, gradients, devices, printing, and what backward may not do."""
import numpy as np
import pytest
from test_gradcheck_layers import CASES, build

from minideeplab import nn
from minideeplab.backend import to_numpy


class Block(nn.Module):
    """A small tree: attributes registered in definition order, a ModuleList, a nested Sequential."""

    def __init__(self, rng):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False, rng=rng)
        self.bn = nn.BatchNorm2d(4)
        self.branches = nn.ModuleList([nn.Sequential(nn.Conv2d(4, 2, 1, rng=rng), nn.ReLU()),
                                       nn.Sequential(nn.Conv2d(4, 2, 3, padding=2, dilation=2, rng=rng))])
        self.head = nn.Conv2d(4, 1, 1, rng=rng)


PARAM_NAMES = ["conv.weight", "bn.weight", "bn.bias", "branches.0.0.weight", "branches.0.0.bias",
               "branches.1.0.weight", "branches.1.0.bias", "head.weight", "head.bias"]
BUFFER_NAMES = ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]


def test_named_parameters_order_and_dotted_names(rng):
    block = Block(rng)
    assert [n for n, _ in block.named_parameters()] == PARAM_NAMES
    assert [p for p in block.parameters()] == [p for _, p in block.named_parameters()]
    assert block.branches[1][0] is dict(block.named_modules())["branches.1.0"]
    seq = nn.Sequential(nn.Conv2d(1, 2, 3, rng=rng), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 1, bias=False))
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight"]


def test_buffers_in_state_dict_not_in_parameters(rng):
    block = Block(rng)
    sd = block.state_dict()
    assert set(sd) == set(PARAM_NAMES) | set(BUFFER_NAMES)
    # per module: parameters, then buffers, modules in definition order (PyTorch's order)
    assert list(sd)[:6] == ["conv.weight", "bn.weight", "bn.bias", *BUFFER_NAMES]
    param_arrays = [p.data for p in block.parameters()]
    assert not any(sd[b] is a for b in BUFFER_NAMES for a in param_arrays)
    assert [n for n, _ in block.named_buffers()] == BUFFER_NAMES
    assert not any(isinstance(v, nn.Parameter) for v in sd.values())


def test_state_dict_round_trip_copies_values(rng):
    src, dst = Block(rng), Block(np.random.default_rng(99))
    src.bn.running_mean[...] = rng.standard_normal(4)
    state = {k: to_numpy(v).copy() for k, v in src.state_dict().items()}
    dst.load_state_dict(state)
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    src.eval()
    dst.eval()
    np.testing.assert_array_equal(src.head(src.bn(src.conv(x))), dst.head(dst.bn(dst.conv(x))))
    state["head.weight"][...] = 123.0       # load_state_dict copied: the module does not alias the dict
    assert not np.any(dst.head.weight.data == 123.0)


def test_load_state_dict_casts_to_module_dtype(rng):
    conv = nn.Conv2d(2, 3, 3, rng=rng)
    conv.load_state_dict({"weight": rng.standard_normal((3, 2, 3, 3)), "bias": np.arange(3.0)})
    assert conv.weight.data.dtype == np.float32 and conv.bias.data.dtype == np.float32
    np.testing.assert_array_equal(conv.bias.data, [0, 1, 2])


def test_load_state_dict_strict_errors_list_every_problem(rng):
    block = Block(rng)
    state = dict(block.state_dict())
    del state["bn.running_var"]
    state["bn.extra"] = np.zeros(4)
    state["head.bias"] = np.zeros(5)
    with pytest.raises(ValueError, match=r"Block\.load_state_dict") as err:
        block.load_state_dict(state)
    msg = str(err.value)
    assert "missing keys (1): bn.running_var;" in msg
    assert "unexpected keys (1): bn.extra;" in msg
    assert "head.bias: expected (1,), got (5,)" in msg


def test_load_state_dict_non_strict(rng):
    block = Block(rng)
    before = block.head.weight.data.copy()
    block.load_state_dict({"bn.bias": np.full(4, 2.0), "not.there": np.zeros(1)}, strict=False)
    np.testing.assert_array_equal(block.bn.bias.data, 2.0)
    np.testing.assert_array_equal(block.head.weight.data, before)
    with pytest.raises(ValueError, match=r"shape mismatch.*bn\.bias: expected \(4,\), got \(3,\)"):
        block.load_state_dict({"bn.bias": np.zeros(3)}, strict=False)   # shapes are always checked


def test_load_state_dict_across_devices(xp, device, rng):
    """A state on one device loads into a module on the other (CuPy <-> NumPy), values and device kept."""
    src = nn.Conv2d(2, 3, 3, rng=rng).to(device)
    dst = nn.Conv2d(2, 3, 3, rng=np.random.default_rng(5))   # stays on the CPU
    dst.load_state_dict(src.state_dict())
    assert isinstance(dst.weight.data, np.ndarray)
    np.testing.assert_array_equal(dst.weight.data, to_numpy(src.weight.data))
    back = nn.Conv2d(2, 3, 3, rng=np.random.default_rng(6)).to(device)
    back.load_state_dict(dst.state_dict())
    assert type(back.weight.data) is type(src.weight.data)
    np.testing.assert_array_equal(to_numpy(back.weight.data), dst.weight.data)


def test_train_eval_recursive(rng):
    block = Block(rng)
    assert all(m.training for m in block.modules())
    assert block.eval() is block
    assert not any(m.training for m in block.modules())
    assert block.train() is block
    assert all(m.training for m in block.modules())
    block.train(False)
    assert not block.branches[0][1].training


def test_zero_grad_and_grad_shapes(rng):
    block = Block(rng)
    for p in block.parameters():
        assert p.grad.shape == p.data.shape and p.grad.dtype == p.data.dtype
        p.grad[...] = 1.0
    block.zero_grad()
    assert all(not np.any(p.grad) for p in block.parameters())


def test_gradients_accumulate_across_backward_calls(xp, device, rng):
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, rng=rng, dtype=np.float64), nn.BatchNorm2d(3, dtype=np.float64),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 1, 1, rng=rng, dtype=np.float64)).to(device)
    x = xp.asarray(rng.standard_normal((2, 2, 6, 6)))
    dout = xp.asarray(rng.standard_normal((2, 1, 3, 3)))
    net(x)
    net.backward(dout)
    once = [to_numpy(p.grad).copy() for p in net.parameters()]
    assert all(np.any(g) for g in once)
    net(x)
    net.backward(dout)
    for g1, p in zip(once, net.parameters()):
        np.testing.assert_allclose(to_numpy(p.grad), 2 * g1, rtol=1e-12, atol=1e-14)
    net.zero_grad()
    net(x)
    net.backward(dout)
    for g1, p in zip(once, net.parameters()):
        np.testing.assert_allclose(to_numpy(p.grad), g1, rtol=1e-12, atol=1e-14)


class Recorder(nn.Module):
    """Multiplies by a constant and logs forward/backward calls."""

    def __init__(self, name, log, factor):
        super().__init__()
        self.name, self.log, self.factor = name, log, factor

    def forward(self, x):
        self.log.append(("forward", self.name))
        return x * self.factor

    def backward(self, dout):
        self.log.append(("backward", self.name))
        return dout * self.factor


def test_sequential_runs_children_forward_then_reverse():
    log = []
    seq = nn.Sequential(Recorder("a", log, 2.0), Recorder("b", log, 3.0), Recorder("c", log, 5.0))
    assert len(seq) == 3 and seq[1].name == "b" and [m.name for m in seq] == ["a", "b", "c"]
    assert float(seq(np.ones(1))[0]) == 30.0
    assert float(seq.backward(np.ones(1))[0]) == 30.0
    assert log == [("forward", "a"), ("forward", "b"), ("forward", "c"),
                   ("backward", "c"), ("backward", "b"), ("backward", "a")]


def test_sequential_backward_equals_manual_chain(rng):
    layers = [nn.Conv2d(2, 3, 3, rng=rng, dtype=np.float64), nn.ReLU(), nn.Upsample(size=(5, 7))]
    seq = nn.Sequential(*layers)
    x, dout = rng.standard_normal((1, 2, 6, 6)), rng.standard_normal((1, 3, 5, 7))
    seq(x)
    dx_seq = seq.backward(dout)
    w_grad = layers[0].weight.grad.copy()
    seq.zero_grad()
    h = layers[1](layers[0](x))
    layers[2](h)
    dx = layers[0].backward(layers[1].backward(layers[2].backward(dout)))
    np.testing.assert_array_equal(dx, dx_seq)
    np.testing.assert_array_equal(layers[0].weight.grad, w_grad)


@pytest.mark.parametrize("kind,case_id,make", CASES, ids=[f"{k}-{c}" for k, c, _ in CASES])
def test_backward_before_forward_is_a_clear_error(kind, case_id, make, xp, device):
    module, inputs = build(case_id, make, device)
    if kind in ("Identity",):
        pytest.skip("Identity caches nothing: its backward is defined without a forward")
    dout = xp.zeros((2, 3, 4, 5))
    with pytest.raises(RuntimeError, match=r"backward called before forward"):
        module.backward(dout)
    # a device/dtype move forgets the cache: backward needs a new forward
    module(*inputs)
    module.to(np.float64)
    with pytest.raises(RuntimeError, match=r"backward called before forward"):
        module.backward(dout)


def _rearm(module):
    for m in module.modules():
        m._forward_done()


@pytest.mark.parametrize("kind,case_id,make", CASES, ids=[f"{k}-{c}" for k, c, _ in CASES])
def test_forward_and_backward_never_mutate_their_arguments(kind, case_id, make, xp, device):
    module, inputs = build(case_id, make, device)
    copies = [x.copy() for x in inputs]
    out = module(*inputs)
    dout = xp.asarray(np.random.default_rng(3).standard_normal(out.shape))
    dout_copy = dout.copy()
    module.backward(dout)
    assert bool(xp.all(dout == dout_copy)), "backward modified dout"
    for x, c in zip(inputs, copies):
        assert bool(xp.all(x == c)), "forward/backward modified the input"
    # a second backward from the same forward gives the same input gradient (nothing cached was consumed). Layers
    # that refuse a second backward (Conv2d: it would add the parameter gradients again) are re-armed for the check
    _rearm(module)
    first = module.backward(dout)
    _rearm(module)
    second = module.backward(dout)
    first, second = (first, second) if isinstance(first, tuple) else ((first,), (second,))
    for a, b in zip(first, second):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


def test_to_dtype_casts_params_grads_buffers(rng):
    block = Block(rng)
    assert block.double() is block
    for p in block.parameters():
        assert p.data.dtype == np.float64 and p.grad.dtype == np.float64
    assert block.bn.running_mean.dtype == np.float64 and block.bn.running_var.dtype == np.float64
    assert block.state_dict()["bn.running_var"] is block.bn.running_var   # buffer registry follows the cast
    assert block.bn.num_batches_tracked.dtype == np.int64                 # integers are not cast
    x = rng.standard_normal((2, 3, 4, 4))
    assert block.conv(x).dtype == np.float64
    block.float()
    assert all(p.data.dtype == np.float32 for p in block.parameters())
    block.to(np.float64)
    assert all(p.data.dtype == np.float64 for p in block.parameters())
    for bad in (np.int32, "gpu", None):   # a misspelt device or None is not silently a dtype either
        with pytest.raises(TypeError, match=r"Block.to: expected 'cpu', 'cuda' or a float dtype, got "):
            block.to(bad)
    assert all(p.data.dtype == np.float64 for p in block.parameters())


def test_to_device_moves_everything(xp, device, rng):
    block = Block(rng).to(device)
    for a in block.state_dict().values():
        assert type(a) is xp.ndarray
    for p in block.parameters():
        assert type(p.grad) is xp.ndarray
    x = xp.asarray(rng.standard_normal((2, 3, 5, 5)).astype(np.float32))
    assert type(block.bn(block.conv(x))) is xp.ndarray
    block.to("cpu")
    assert all(type(a) is np.ndarray for a in block.state_dict().values())


def test_repr_is_readable(rng):
    seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, dilation=1, bias=False, rng=rng), nn.BatchNorm2d(4),
                        nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.Dropout(0.1), nn.Upsample(scale_factor=2))
    assert repr(seq).splitlines() == [
        "Sequential(",
        "  (0): Conv2d(3, 4, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)",
        "  (1): BatchNorm2d(4, eps=1e-05, momentum=0.1, affine=True)",
        "  (2): ReLU()",
        "  (3): MaxPool2d(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))",
        "  (4): Dropout(p=0.1)",
        "  (5): Upsample(scale_factor=(2.0, 2.0), mode='bilinear', align_corners=False)",
        ")",
    ]
    assert "(branches): ModuleList(" in repr(Block(rng))
    assert "    (0): Sequential(" in repr(Block(rng))
    assert repr(nn.Parameter(np.zeros((2, 3)))) == "Parameter(shape=(2, 3), dtype=float64)"


def test_module_without_super_init_is_a_clear_error():
    class Broken(nn.Module):
        def __init__(self):
            self.w = 1

    with pytest.raises(AttributeError, match=r"Broken.__init__ must call super\(\).__init__\(\) first"):
        Broken()


def test_dropout_masks_scaling_and_reproducibility():
    x = np.ones((4, 8, 16, 16))
    a = nn.Dropout(0.3, rng=np.random.default_rng(1))
    b = nn.Dropout(0.3, rng=np.random.default_rng(1))
    out = a(x)
    np.testing.assert_array_equal(out, b(x))                  # same generator state, same mask
    assert set(np.unique(out)) == {0.0, 1 / 0.7}              # survivors scaled by 1/(1-p)
    assert abs(np.mean(out == 0) - 0.3) < 0.02                # 8192 draws: 0.3 +- 5 sigma
    out2 = a(x)
    assert not np.array_equal(out, out2)                      # a new mask per call
    dx = a.backward(np.full_like(x, 2.0))                     # the mask of the last forward, scaled
    np.testing.assert_array_equal(dx, 2.0 * out2)
    assert a.eval()(x) is x                                    # identity in eval mode
    np.testing.assert_array_equal(a.backward(x), x)


def test_bn_running_estimates_use_unbiased_variance():
    """Independent arithmetic: one step from (0, 1) with momentum 0.5 on a known batch."""
    bn = nn.BatchNorm2d(1, momentum=0.5, dtype=np.float64)
    x = np.array([1.0, 2.0, 3.0, 6.0]).reshape(2, 1, 1, 2)   # mean 3, biased var 3.5, unbiased 14/3
    bn(x)
    np.testing.assert_allclose(bn.running_mean, [0.5 * 0 + 0.5 * 3.0])
    np.testing.assert_allclose(bn.running_var, [0.5 * 1 + 0.5 * 14 / 3])
    assert int(bn.num_batches_tracked) == 1
    out = bn(x)   # train mode normalises with the batch's biased variance
    np.testing.assert_allclose(out.ravel(), (np.array([1, 2, 3, 6]) - 3) / np.sqrt(3.5 + 1e-5))


def test_sigmoid_and_batchnorm_stay_finite_at_extremes():
    x = np.array([-1e4, -100.0, 0.0, 100.0, 1e4], dtype=np.float32).reshape(1, 1, 1, 5)
    with np.errstate(all="raise"):                      # no overflow on the way
        s = nn.Sigmoid()(x)
        bn = nn.BatchNorm2d(1)
        out = bn(np.full((2, 1, 3, 3), 7.0, dtype=np.float32))   # a constant channel: variance 0
        dx = bn.backward(np.ones((2, 1, 3, 3), dtype=np.float32))
    np.testing.assert_array_equal(s.ravel(), [0.0, 0.0, 0.5, 1.0, 1.0])
    np.testing.assert_array_equal(out, 0.0)
    assert np.all(np.isfinite(dx))


def test_zero_grad_is_lazy_but_reads_and_accumulates_like_zeros(xp):
    p = nn.Parameter(xp.ones((2, 3)))
    p.accumulate(xp.full((2, 3), 2.0))
    assert float(p.grad.sum()) == 12.0                      # accumulate adds: 0 + 2
    p.accumulate(xp.ones((2, 3)))
    assert float(p.grad.sum()) == 18.0                      # 2 + 1
    p.zero_grad()
    assert float(p.grad.sum()) == 0.0                       # read after zero_grad: zeros
    p.zero_grad()
    held = p._grad
    p.accumulate(xp.full((2, 3), 5.0))                      # first accumulate after zero_grad: a copy, in place
    assert p.grad is held and float(p.grad.sum()) == 30.0
    p.zero_grad()
    p.grad[0, 0] = 7.0                                      # writing through .grad sees the zeros first
    assert float(p.grad.sum()) == 7.0


def test_grad_out_takes_the_first_gradient_of_a_step_straight_into_grad(xp):
    p = nn.Parameter(xp.ones((2, 3)))
    p.zero_grad()
    held = p._grad
    out = p.grad_out((6,))                                 # pending zero: grad itself, viewed as asked
    out[...] = xp.arange(6.0)
    assert p.grad is held
    np.testing.assert_array_equal(to_numpy(p.grad), np.arange(6.0).reshape(2, 3))
    assert p.grad_out() is None                             # a gradient is there now: the caller must add to it
    p.accumulate_sum(xp.ones((4, 2, 3)), axis=0)            # adds a.sum(axis)
    np.testing.assert_array_equal(to_numpy(p.grad), np.arange(6.0).reshape(2, 3) + 4)
    p.zero_grad()
    p.accumulate_sum(xp.ones((2, 5, 3, 2)), axis=(1, -1))   # first gradient after zero_grad: summed into grad
    assert p.grad is held
    np.testing.assert_array_equal(to_numpy(p.grad), np.full((2, 3), 10.0))


def test_grad_out_declines_a_grad_that_a_reshape_would_copy(xp):
    p = nn.Parameter(xp.ones((3, 2)))
    p.grad = xp.zeros((2, 3)).T                             # not C-contiguous: a reshape of it is a copy
    p.zero_grad()
    assert p.grad_out((6,)) is None
    p.accumulate(xp.full((3, 2), 2.0))                      # still pending zero: accumulate copies
    np.testing.assert_array_equal(to_numpy(p.grad), np.full((3, 2), 2.0))
