"""What a step captured as a CUDA graph needs (``backend.cuda_graph``): no host reads while capturing, masks drawn
ahead into arrays that stay put, and, on a GPU, replays that train exactly as the eager steps do.

On the CPU a ``profiler.CountingArray`` with ``capturing = True`` stands for a device array under capture: the code
takes the capture's path (``backend.can_read`` is False), so that path is checked here against the eager one."""
import numpy as np
import pytest

from minideeplab.backend import can_read, cuda_available, cuda_graph, synchronize, to_device, to_numpy
from minideeplab.losses import BCEWithLogitsLoss, DiceLoss
from minideeplab.models import DeepLabConfig, build_deeplab
from minideeplab.nn import Conv2d, Dropout
from minideeplab.nn.fused import relu_of_affine
from minideeplab.optim import SGD
from minideeplab.profiler import CountingArray


@pytest.fixture
def capturing(monkeypatch):
    """CountingArrays behave as device arrays under capture; their host reads are counted from zero."""
    monkeypatch.setattr(CountingArray, "capturing", True)
    CountingArray.syncs.clear()
    return lambda a: np.asarray(a).view(CountingArray)


def test_can_read_everywhere_but_under_capture(xp, capturing):
    assert can_read(xp.zeros(3))                     # NumPy, or CuPy outside a capture
    assert not can_read(capturing(np.zeros(3)))


def test_relu_of_affine_under_capture_takes_the_general_path(capturing):
    """All scales positive: eagerly ``max(src, lo)`` with no upper bound; under capture ``clip`` with infinite upper
    bounds: the same z, the same mask, and not one host read."""
    rng = np.random.default_rng(0)
    src, scale, shift = rng.standard_normal((2, 3, 4, 4)), np.array([0.5, 1.0, 2.0]), np.array([0.1, -0.3, 0.2])
    z, lo, hi, b, _ = relu_of_affine(src, scale, shift)
    zc, loc, hic, bc, _ = relu_of_affine(*(capturing(a) for a in (src, scale, shift)))
    assert hi is None and np.all(np.asarray(hic) == np.inf)
    np.testing.assert_array_equal(np.asarray(zc), z)
    np.testing.assert_array_equal(np.asarray(loc), lo)
    np.testing.assert_array_equal(np.asarray(bc), b)
    assert sum(CountingArray.syncs.values()) == 0


def test_relu_of_affine_under_capture_handles_every_kind_of_channel(capturing):
    """Scales positive, negative, 0 and so small that the bound overflows (test_fused's channels): the general path
    taken under capture gives what the eager one gives, with no host read."""
    from test_fused import SCALES, SHIFTS
    rng = np.random.default_rng(1)
    scale, shift = np.array(SCALES), np.array(SHIFTS)
    src = rng.standard_normal((2, len(scale), 5, 4)) * 3
    eager = relu_of_affine(src, scale, shift)
    captured = [np.asarray(a) for a in relu_of_affine(*(capturing(a) for a in (src, scale, shift)))]
    for name, a, b in zip(("z", "lo", "hi", "shift", "blocked"), captured, eager):
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert sum(CountingArray.syncs.values()) == 0


def test_loss_under_capture_skips_only_the_target_check(capturing):
    """The 0/1 check of the target reads on the host: eagerly a bad target is an error, under capture (where it
    cannot be read) the loss is computed as it is."""
    logits, target = np.zeros((1, 1, 2, 2)), np.array([0.0, 1.0, 2.0, 1.0]).reshape(1, 1, 2, 2)
    for loss in (BCEWithLogitsLoss(), DiceLoss()):
        with pytest.raises(ValueError, match="binary mask"):
            loss(logits, target)
        value = loss(capturing(logits), capturing(target))
        assert np.isfinite(float(np.asarray(value)))
    assert CountingArray.syncs["bool"] == 0


def _tiny_model(device="cpu", seed=0):
    config = DeepLabConfig.small(output_stride=8, dropout=0.3)
    return build_deeplab(config, rng=np.random.default_rng(seed), dtype=np.float64).to(device)


def test_training_step_under_capture_matches_the_eager_step(capturing):
    """A step of the tiny DeepLabV3 (forward, BCE, backward, SGD) whose arrays read as under capture computes what
    the eager step computes, in float64, without one host read; eval forward too."""
    rng = np.random.default_rng(3)
    x, t = rng.standard_normal((2, 3, 32, 32)), (rng.random((2, 1, 32, 32)) < 0.4).astype(np.float64)
    results = []
    for wrap in (np.asarray, capturing):
        model = _tiny_model()
        if wrap is capturing:
            model._apply(lambda a: a.view(CountingArray))
        opt, loss_fn = SGD(model.parameters(), lr=0.1, momentum=0.9), BCEWithLogitsLoss()
        CountingArray.syncs.clear()
        for _ in range(2):
            opt.zero_grad()
            logits = model(wrap(x))
            loss_fn(logits, wrap(t))
            model.backward(loss_fn.backward())
            opt.step()
        model.eval()
        out = model(wrap(x))
        results.append((np.asarray(logits), np.asarray(out), {k: np.asarray(v) for k, v in model.state_dict().items()}))
        heads = [m.fused_head for m in model.modules() if hasattr(m, "fused_head")]
        # eagerly (all scales positive at init) every head clips from below only; under capture each takes clip
        assert len(heads) == 11 and all((h.hi is None) == (wrap is np.asarray) for h in heads)
        if wrap is capturing:
            assert sum(CountingArray.syncs.values()) == 0
    (logits_e, out_e, state_e), (logits_c, out_c, state_c) = results
    np.testing.assert_allclose(logits_c, logits_e, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out_c, out_e, rtol=1e-10, atol=1e-12)
    assert state_c.keys() == state_e.keys()
    for name in state_e:    # parameters after two updates (from gradients of both paths), running statistics
        np.testing.assert_allclose(state_c[name], state_e[name], rtol=1e-9, atol=1e-12, err_msg=name)


def test_dropout_draw_ahead_draws_what_forward_would(xp):
    """Masks drawn ahead are the ones forward draws itself from the same generator, in one array that stays put."""
    x = xp.ones((2, 3, 4, 5))
    eager, ahead = (Dropout(0.4, rng=np.random.default_rng(5)) for _ in range(2))
    ahead(x)
    first = eager(x)
    np.testing.assert_array_equal(to_numpy(ahead.scale_mask), to_numpy(eager.scale_mask))
    arrays = set()
    for _ in range(3):
        ahead.draw_ahead()
        arrays.add(id(ahead.ahead))
        out = ahead(x)
        assert ahead.scale_mask is ahead.ahead and not ahead.ahead_ready
        np.testing.assert_array_equal(to_numpy(out), to_numpy(eager(x)))
    assert len(arrays) == 1 and not np.array_equal(to_numpy(out), to_numpy(first))
    np.testing.assert_array_equal(to_numpy(ahead.backward(x)), to_numpy(out))   # dL/dx = dout * mask / (1 - p)


def test_dropout_draw_ahead_errors():
    d = Dropout(0.5, rng=np.random.default_rng(0))
    with pytest.raises(RuntimeError, match="Dropout.draw_ahead: needs a training forward first"):
        d.draw_ahead()
    d(np.ones((2, 3)))
    d.draw_ahead()
    with pytest.raises(ValueError, match=r"Dropout: the mask drawn ahead has shape \(2, 3\)"):
        d(np.ones((4, 3)))


@pytest.mark.skipif(cuda_available(), reason="checks the error without a GPU")
def test_cuda_graph_needs_a_gpu():
    with pytest.raises(ValueError, match="cuda_graph: needs CuPy and a visible GPU"):
        cuda_graph(lambda: None)


def test_as_captured_makes_device_arrays_unreadable_without_capturing(monkeypatch):
    """``cuda_graph``'s warm-up runs ``as_captured``: device arrays answer ``can_read`` False, as while capturing,
    so that the capture's path and its kernels run (and compile) before the capture. A stand-in CuPy here."""
    from types import SimpleNamespace

    from minideeplab import backend

    class DeviceArray(np.ndarray):
        pass
    stream = SimpleNamespace(is_capturing=lambda: False)
    fake = SimpleNamespace(ndarray=DeviceArray, cuda=SimpleNamespace(runtime=SimpleNamespace(is_hip=False),
                                                                     get_current_stream=lambda: stream))
    monkeypatch.setattr(backend, "_cupy", fake)
    a = np.zeros(3).view(DeviceArray)
    assert can_read(a) and can_read(np.zeros(3))
    with backend.as_captured():
        assert not can_read(a) and can_read(np.zeros(3))     # NumPy arrays can always be read
        with backend.as_captured():
            assert not can_read(a)
        assert not can_read(a)
    assert can_read(a)
    with pytest.raises(RuntimeError), backend.as_captured():
        raise RuntimeError("a failing warm-up step")
    assert can_read(a)                                       # restored after an error too


@pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a GPU")
def test_cuda_graph_replays_train_as_the_eager_steps():
    """Tiny DeepLabV3 with dropout, SGD with momentum: 1 eager step, 2 warm-up steps, the capture (which runs
    nothing but draws one set of masks), then 3 replays, against 6 eager steps that skip that set of masks."""
    rng = np.random.default_rng(3)
    x = to_device(rng.standard_normal((2, 3, 32, 32)), "cuda")
    t = to_device((rng.random((2, 1, 32, 32)) < 0.4).astype(np.float64), "cuda")
    models = [_tiny_model("cuda"), _tiny_model("cuda")]
    steps = []
    for model in models:
        opt, loss_fn = SGD(model.parameters(), lr=0.1, momentum=0.9), BCEWithLogitsLoss()

        def step(model=model, opt=opt, loss_fn=loss_fn):
            opt.zero_grad()
            loss_fn(model(x), t)
            model.backward(loss_fn.backward(), input_grad=False)
            opt.step()
        steps.append(step)
    eager, graphed = steps
    dropouts = [m for m in models[1].modules() if isinstance(m, Dropout)]
    graphed()
    replay = cuda_graph(graphed, prepare=lambda: [d.draw_ahead() for d in dropouts])
    for _ in range(3):
        replay()
    for i in range(6):
        if i == 3:    # the masks the capture drew
            for d in (m for m in models[0].modules() if isinstance(m, Dropout)):
                d.rng.random(d.scale_mask.shape)
        eager()
    synchronize()
    # the captured GEMMs are cuBLAS's strided-batched entry point, eager ones CuPy's: their sums may round apart in
    # the last bits (1.8e-12 on a weight of 6e-4 after 6 steps, float64, seen on an H200)
    for (name, a), (_, b) in zip(models[0].state_dict().items(), models[1].state_dict().items()):
        np.testing.assert_allclose(to_numpy(b), to_numpy(a), rtol=1e-9, atol=1e-10, err_msg=name)


@pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a GPU")
@pytest.mark.parametrize("algorithm", ["im2col", "gather", "kn2row", "taps"])
def test_cuda_graph_captures_every_conv_algorithm(algorithm):
    """A 3x3 conv of dilation 5 on 5x9 (the 6 taps off the middle row read only padding) forced to each algorithm,
    forward and backward captured and replayed on new input: the output and gradients of an eager run on it."""
    import cupy
    rng = np.random.default_rng(4)
    convs = [Conv2d(3, 4, 3, padding=5, dilation=5, rng=np.random.default_rng(0), algorithm=algorithm,
                    dtype=np.float64).to("cuda") for _ in range(2)]
    x = cupy.asarray(rng.standard_normal((2, 3, 5, 9)))
    dout = cupy.asarray(rng.standard_normal((2, 4, 5, 9)))
    results = {}

    def step(conv=convs[1]):
        conv.zero_grad()
        results["out"] = conv(x)
        results["dx"] = conv.backward(dout)
    step()
    replay = cuda_graph(step)
    x[...] = cupy.asarray(rng.standard_normal(x.shape))
    replay()
    synchronize()
    captured = [to_numpy(results["out"]), to_numpy(results["dx"]), to_numpy(convs[1].weight.grad)]
    convs[0].zero_grad()
    eager = [to_numpy(convs[0](x)), to_numpy(convs[0].backward(dout)), to_numpy(convs[0].weight.grad)]
    for name, c, e in zip(("out", "dx", "dW"), captured, eager):
        np.testing.assert_allclose(c, e, rtol=1e-10, atol=1e-12, err_msg=f"{algorithm} {name}")
