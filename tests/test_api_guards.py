"""API misuse gives a clear error instead of a silent wrong result: Parameter.data and .grad stay consistent, one
backward per forward, integer buffers load exactly, loss hyper-parameters are finite and in range, and the
network's minimum input size (computed from its layers) is checked before it runs."""
import numpy as np
import pytest

from minideeplab import nn
from minideeplab.backend import to_numpy
from minideeplab.gradcheck import check_module
from minideeplab.losses import BCEWithLogitsLoss, CombinedLoss, DiceLoss, FocalLoss, build_loss
from minideeplab.models import DeepLabConfig, build_deeplab
from minideeplab.models.densenet import min_input_size, min_input_size_for
from minideeplab.optim import build_optimizer
from minideeplab.train import TrainConfig


# -- Parameter.data / .grad ---------------------------------------------------------------------------------------
def test_float64_data_on_a_float32_parameter_takes_the_gradient_along(xp):
    p = nn.Parameter(xp.ones((2, 3), dtype=np.float32))
    p.accumulate(xp.full((2, 3), 0.5, dtype=np.float32))
    p.data = xp.zeros((2, 3), dtype=np.float64)
    assert p.grad.dtype == np.float64 and p.grad.shape == (2, 3)
    np.testing.assert_array_equal(to_numpy(p.grad), 0.5)                 # an accumulated gradient is kept
    p.zero_grad()
    p.data = xp.zeros((2, 3), dtype=np.float32)                            # pending zero: stays zero
    assert p.grad.dtype == np.float32 and not to_numpy(p.grad).any()


def test_optimizer_repacks_after_a_dtype_change_and_updates_in_the_new_dtype(xp):
    params = [nn.Parameter(xp.ones(4, dtype=np.float32)), nn.Parameter(xp.ones(3, dtype=np.float32))]
    opt = build_optimizer("sgd", params, lr=0.5, momentum=0.9)
    for p in params:
        p.grad[...] = 1
    opt.step()
    params[0].data = params[0].data.astype(np.float64)
    params[0].grad[...] = 1
    params[1].grad[...] = 1
    opt.step()                                                             # moves the float64 one into its group
    assert params[0].data.dtype == np.float64 and params[0].grad.dtype == np.float64
    assert {g.data.dtype for g in opt._groups} == {np.dtype(np.float32), np.dtype(np.float64)}
    assert all(p.lives_in(*g.views[k]) for g in opt._groups for k, p in enumerate(params[i] for i in g.idx))
    # sgd with momentum 0.9 from 1: step 1 -0.5, step 2 -0.5 * (1 + 0.9): both parameters alike
    for p in params:
        np.testing.assert_allclose(to_numpy(p.data), 1 - 0.5 - 0.5 * 1.9, rtol=1e-6)


@pytest.mark.parametrize("value, error, words", [
    (np.zeros((3, 2), np.float32), ValueError, "shape (3, 2) to a parameter of shape (2, 3)"),
    (np.zeros((2, 3), np.int64), TypeError, "floating-point values, got dtype int64"),
    ([[0.0] * 3] * 2, TypeError, "expected a NumPy or CuPy array, got list"),
])
def test_parameter_data_refuses_other_shapes_and_non_float(value, error, words):
    p = nn.Parameter(np.ones((2, 3), np.float32))
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        p.data = value


@pytest.mark.parametrize("value", [np.zeros((3, 2), np.float32), np.zeros((2, 3), np.float64), None])
def test_parameter_grad_must_match_the_data(value):
    p = nn.Parameter(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"Parameter.grad: expected an array of the data's shape \(2, 3\), dtype float32"):
        p.grad = value


# -- one backward per forward -------------------------------------------------------------------------------------
def test_second_backward_of_the_model_raises(rng):
    model = build_deeplab(DeepLabConfig.small(), rng=rng)
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    dout = np.ones((2, 1, 32, 32), np.float32)
    model(x)
    model.backward(dout)
    grads = [p.grad.copy() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"DeepLabV3.backward called a second time after one forward"):
        model.backward(dout)
    for p, g in zip(model.parameters(), grads):                  # nothing was added by the refused backward
        np.testing.assert_array_equal(p.grad, g)
    model(x)
    model.backward(dout)                                          # a new forward allows the next one
    with pytest.raises(RuntimeError, match=r"DenseNet.backward called a second time"):
        model.backbone.backward(np.ones((2, 80, 2, 2), np.float32))


def test_second_backward_of_a_conv_raises_and_gradcheck_still_works(rng):
    conv = nn.Conv2d(2, 3, 3, padding=1, rng=rng, dtype=np.float64)
    x = rng.standard_normal((2, 2, 5, 5))
    with pytest.raises(RuntimeError, match=r"Conv2d.backward called before forward"):
        conv.backward(np.ones((2, 3, 5, 5)))
    conv(x)
    conv.backward(np.ones((2, 3, 5, 5)))
    with pytest.raises(RuntimeError, match=r"Conv2d.backward called a second time after one forward"):
        conv.backward(np.ones((2, 3, 5, 5)))
    check_module(conv, x, rng=rng)                                # one backward per forward: unaffected


# -- load_state_dict: exact integers, short messages --------------------------------------------------------------
@pytest.mark.parametrize("value, ok", [(3.0, True), (np.int64(7), True), (3.7, False), (np.nan, False),
                                       (np.inf, False)])
def test_integer_buffer_loads_whole_numbers_only(value, ok, rng):
    bn = nn.BatchNorm2d(2)
    state = dict(bn.state_dict())
    state["num_batches_tracked"] = np.array(value)
    if ok:
        bn.load_state_dict(state)
        assert int(bn.num_batches_tracked) == int(value)
        return
    with pytest.raises(ValueError, match=r"num_batches_tracked: .* is not a whole number"):
        bn.load_state_dict(state)
    assert int(bn.num_batches_tracked) == 0                        # refused before anything was copied


def test_load_state_dict_between_model_sizes_is_short(rng):
    small = build_deeplab(DeepLabConfig.small(), rng=rng)
    big = build_deeplab(DeepLabConfig(), rng=rng)
    with pytest.raises(ValueError) as err:
        small.load_state_dict(big.state_dict())
    message = str(err.value)
    assert len(message) < 1000, len(message)
    assert "unexpected keys (" in message and "shape mismatches (" in message and "more" in message


# -- loss hyper-parameters ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, error, words", [
    (lambda: DiceLoss(smooth=float("inf")), ValueError, "DiceLoss: smooth must be > 0 and finite, got inf"),
    (lambda: DiceLoss(smooth=float("nan")), ValueError, "DiceLoss: smooth must be > 0 and finite, got nan"),
    (lambda: DiceLoss(smooth=0), ValueError, "smooth must be > 0"),
    (lambda: DiceLoss(smooth="1"), TypeError, "smooth must be a real number, got str"),
    (lambda: FocalLoss(gamma=float("nan")), ValueError, "gamma must be >= 0 and finite, got nan"),
    (lambda: FocalLoss(gamma=-0.5), ValueError, "gamma must be >= 0"),
    (lambda: FocalLoss(alpha=float("nan")), ValueError, "alpha must be <= 1 and finite"),
    (lambda: FocalLoss(alpha=1.5), ValueError, "alpha must be <= 1"),
    (lambda: FocalLoss(alpha=-float("inf")), ValueError, "alpha must be <= 1 and finite"),
    (lambda: BCEWithLogitsLoss(pos_weight=float("nan")), ValueError, "pos_weight must be >= 0 and finite, got nan"),
    (lambda: BCEWithLogitsLoss(pos_weight=np.array([1.0, np.inf])), ValueError, "got inf"),
    (lambda: BCEWithLogitsLoss(pos_weight="heavy"), TypeError, "pos_weight must be a"),
    (lambda: CombinedLoss([(float("nan"), DiceLoss())]), ValueError, "weight 0 must be finite"),
    (lambda: build_loss("focal", gamma=float("inf")), ValueError, "gamma must be >= 0 and finite"),
])
def test_loss_hyper_parameters_are_checked(make, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(")):
        make()


def test_loss_hyper_parameters_in_range_still_work():
    assert FocalLoss(alpha=-1).alpha is None and FocalLoss(alpha=None).alpha is None
    assert FocalLoss(alpha=0.0, gamma=0).gamma == 0.0 and DiceLoss(smooth=1e-6).smooth == 1e-6


# -- the minimum input size ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("output_stride, expected", [(8, 5), (16, 13), (32, 29)])
def test_minimum_input_size_is_where_the_layers_stop_failing(output_stride, expected):
    """Worked by hand: conv0 (7x7/2, pad 3) and pool0 (3x3/2, pad 1) give ceil(H/2) each, and each pooled
    transition's 2x2/2 average pool floor(H/2), which needs >= 2. Checked against the layers themselves: the
    backbone's features (run without the model's check) fail one pixel below and run at the minimum."""
    model = build_deeplab(DeepLabConfig.small(output_stride=output_stride), rng=np.random.default_rng(0)).eval()
    assert model.min_input_size == min_input_size(model.backbone) == min_input_size_for(output_stride) == expected
    features = model.backbone.features
    x = np.zeros((1, 3, expected, expected + 3), np.float32)
    assert features(x).shape[2] == 1                               # the last pooling has exactly one pixel
    for shape in ((1, 3, expected - 1, expected + 3), (1, 3, expected + 3, expected - 1)):
        with pytest.raises(ValueError, match=r"AvgPool2d|Conv2d|MaxPool2d"):
            features(np.zeros(shape, np.float32))
        with pytest.raises(ValueError, match=rf"DeepLabV3: input of {shape[2]}x{shape[3]} pixels is too small at "
                                             rf"output stride {output_stride}: the network needs at least "
                                             rf"{expected}x{expected}"):
            model(np.zeros(shape, np.float32))


@pytest.mark.parametrize("output_stride, smallest", [(8, 5), (16, 13), (32, 29)])
def test_train_config_checks_the_image_size_against_the_output_stride(output_stride, smallest):
    TrainConfig(output_stride=output_stride, image_size=smallest).validate()
    with pytest.raises(ValueError, match=rf"image_size {smallest - 1} is too small at output stride {output_stride}"):
        TrainConfig(output_stride=output_stride, image_size=smallest - 1).validate()


def test_training_at_the_minimum_size_runs(tmp_path):
    from minideeplab.train import Trainer
    cfg = TrainConfig(model="small", output_stride=32, image_size=29, batch_size=2, train_size=2, val_size=2,
                      epochs=1)
    history = Trainer(cfg, progress=False, figures=False).fit()
    assert np.isfinite(history[-1]["train_loss"])
