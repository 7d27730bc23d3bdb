"""Multi-scale and flip inference, and the evaluation loop with its options."""
import numpy as np
import pytest

from minideeplab.backend import to_numpy
from minideeplab.data import DataLoader, SyntheticShapes
from minideeplab.inference import PAPER_SCALES, evaluate_model, predict_proba
from minideeplab.models import DeepLabConfig, build_deeplab
from minideeplab.nn import BatchNorm2d, interpolate, no_grad, sigmoid
from minideeplab.train import evaluate


@pytest.fixture
def model():
    net = build_deeplab(DeepLabConfig.small(), rng=np.random.default_rng(0))
    rng = np.random.default_rng(1)
    for m in net.modules():             # running statistics and shifts that make eval mode non-trivial
        if isinstance(m, BatchNorm2d):
            m.running_mean[...] = rng.normal(0, 0.2, m.num_features)
            m.running_var[...] = rng.uniform(0.5, 1.5, m.num_features)
            m.bias.data[...] = rng.normal(0, 0.3, m.num_features)
    return net.eval()


def batch(xp, shape=(2, 3, 40, 48), seed=2):
    return xp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def test_single_scale_is_the_plain_forward(xp, device, model):
    model.to(device)
    x = batch(xp)
    with no_grad():     # as predict_proba runs it (on the CPU no_grad splits the batch over threads: other rounding)
        plain = to_numpy(sigmoid(model(x)))
    np.testing.assert_array_equal(to_numpy(predict_proba(model, x)), plain)
    np.testing.assert_array_equal(to_numpy(predict_proba(model, x, scales=[1])), plain)


def test_flip_averages_the_mirrored_pass(xp, device, model):
    model.to(device)
    x = batch(xp)
    plain = to_numpy(sigmoid(model(x)))
    mirrored = to_numpy(sigmoid(model(xp.ascontiguousarray(x[..., ::-1]))))[..., ::-1]
    got = to_numpy(predict_proba(model, x, flip=True))
    np.testing.assert_allclose(got, (plain + mirrored) / 2, rtol=1e-6, atol=1e-7)
    assert np.abs(plain - mirrored).max() > 1e-3          # the model itself is not mirror-symmetric ...
    # ... but flip averaging is: a mirrored input gives the mirrored output, and a symmetric input a symmetric one
    back = to_numpy(predict_proba(model, xp.ascontiguousarray(x[..., ::-1]), flip=True))[..., ::-1]
    np.testing.assert_allclose(back, got, rtol=1e-5, atol=1e-6)
    sym = xp.concatenate([x, x[..., ::-1]], axis=-1)
    out = to_numpy(predict_proba(model, sym, flip=True))
    np.testing.assert_allclose(out, out[..., ::-1], rtol=1e-5, atol=1e-6)


def test_multi_scale_resizes_and_averages(xp, device, model):
    model.to(device)
    x = batch(xp, (2, 3, 37, 45))               # odd sizes: each scale rounds
    scales = (0.5, 1.25)
    expected = 0
    for size in [(18, 22), (46, 56)]:        # (round(37 s), round(45 s)) for s = 0.5, 1.25, written out
        logits = model(interpolate(x, size))
        assert tuple(logits.shape) == (2, 1) + size
        expected = expected + to_numpy(sigmoid(interpolate(logits, (37, 45))))
    got = to_numpy(predict_proba(model, x, scales=scales))
    assert got.shape == (2, 1, 37, 45)
    np.testing.assert_allclose(got, expected / 2, rtol=1e-6, atol=1e-7)
    both = to_numpy(predict_proba(model, x, scales=PAPER_SCALES, flip=True))
    assert both.shape == (2, 1, 37, 45) and both.min() >= 0 and both.max() <= 1


def test_predict_proba_puts_the_model_in_eval_mode_and_checks_scales(model):
    model.train()
    predict_proba(model, batch(np, (1, 3, 32, 32)))      # batch 1: fine in eval mode only
    assert not model.training
    with pytest.raises(ValueError, match="scales must be one or more positive numbers"):
        predict_proba(model, batch(np), scales=(1.0, 0))
    with pytest.raises(ValueError, match="scales"):
        predict_proba(model, batch(np), scales=())


def test_evaluate_model(model):
    loader = DataLoader(SyntheticShapes(6, 40, seed=1, split=1), 4)
    plain = evaluate_model(model, loader)
    reference = evaluate(model, loader)
    for k in ("iou", "dice", "tp", "fp", "boundary_iou", "trimap_iou_2px"):
        assert plain[k] == reference[k], k
    assert plain["seconds_per_image"] > 0
    at8 = evaluate_model(model, loader, output_stride=8, scales=(0.75, 1.0), flip=True, widths=(1, 3))
    assert model.output_stride == 16 and model.head.aspp.rates == (6, 12, 18)     # switched back
    assert {"trimap_iou_1px", "trimap_iou_3px"} <= at8.keys() and "trimap_iou_2px" not in at8
    assert at8["tp"] + at8["fp"] + at8["fn"] + at8["tn"] == 6 * 40 * 40
