"""Switching a model's output stride after it was built (train at 16, evaluate at 8), and the ASPP ablations."""
import numpy as np
import pytest

from minideeplab.backend import to_numpy
from minideeplab.gradcheck import check_module
from minideeplab.models import ASPP, DeepLabConfig, build_deeplab, set_output_stride
from minideeplab.nn import BatchNorm2d, Conv2d


def trained_looking(model, seed=0):
    """Random BN statistics and affine parameters, so that eval mode is not the identity at initialisation."""
    rng = np.random.default_rng(seed)
    for m in model.modules():
        if isinstance(m, BatchNorm2d):
            m.running_mean[...] = rng.normal(0, 0.2, m.num_features)
            m.running_var[...] = rng.uniform(0.5, 1.5, m.num_features)
            m.weight.data[...] = rng.uniform(0.5, 1.5, m.num_features)
            m.bias.data[...] = rng.normal(0, 0.2, m.num_features)
    return model


def small(os_, seed=0, device="cpu", **kw):
    model = build_deeplab(DeepLabConfig.small(output_stride=os_, **kw), rng=np.random.default_rng(seed))
    return trained_looking(model, seed).to(device)


def test_round_trip_gives_identical_logits(xp, device):
    model = small(16, device=device, dropout=0.0)       # no dropout: training-mode forwards are comparable
    x = xp.asarray(np.random.default_rng(1).standard_normal((2, 3, 64, 48)).astype(np.float32))
    model.eval()
    before = to_numpy(model(x))
    for os_ in (8, 32, 16):
        model.set_output_stride(os_)
        model(x)
    np.testing.assert_array_equal(to_numpy(model(x)), before)
    model.train()               # batch statistics (a training-mode forward does not read the running ones)
    before = to_numpy(model(x))
    for os_ in (8, 16):
        model.set_output_stride(os_)
    np.testing.assert_array_equal(to_numpy(model(x)), before)
    assert model.config == DeepLabConfig.small(output_stride=16, dropout=0.0)


@pytest.mark.parametrize("start, target, rates, expected_rates", [
    (16, 8, None, (12, 24, 36)),
    (16, 32, None, (3, 6, 9)),
    (8, 16, None, (6, 12, 18)),
    (16, 8, (2, 4, 6), (4, 8, 12)),
])
def test_switched_equals_built(xp, device, start, target, rates, expected_rates):
    model = small(start, device=device, rates=rates).eval()
    set_output_stride(model, target)
    assert model.output_stride == model.backbone.output_stride == model.config.output_stride == target
    assert model.rates == model.head.aspp.rates == model.config.resolved_rates == expected_rates
    built = build_deeplab(DeepLabConfig.small(output_stride=target, rates=rates and expected_rates),
                          rng=np.random.default_rng(99)).to(device).eval()
    built.load_state_dict(model.state_dict())
    assert built.config == model.config
    assert repr(built) == repr(model)            # same layers, dilations, paddings, pools, in the same order
    x = xp.asarray(np.random.default_rng(2).standard_normal((2, 3, 64, 64)).astype(np.float32))
    np.testing.assert_array_equal(to_numpy(model(x)), to_numpy(built(x)))


def test_conv_caches_are_invalidated():
    # The "gather" path caches its indices per map size (not per dilation). A 64 px input at OS 16 and a 32 px input
    # at OS 8 give denseblock4 the same 4x4 map with dilation 2, then 4: a stale cache would reuse the wrong indices.
    model = small(16).eval()
    fresh = small(8).eval()
    for net in (model, fresh):
        for m in net.modules():
            if isinstance(m, Conv2d) and m.kernel_size == (3, 3):
                m.algorithm = "gather"
    rng = np.random.default_rng(3)
    model(rng.standard_normal((2, 3, 64, 64)).astype(np.float32))
    model.set_output_stride(8)
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(model(x), fresh(x))
    with pytest.raises(RuntimeError, match="backward called before forward"):
        small(16).eval().set_output_stride(8).head.classifier.backward(np.zeros((1, 1, 2, 2), np.float32))


def test_gradients_after_switching():
    model = build_deeplab(DeepLabConfig.small(output_stride=16), rng=np.random.default_rng(8), dtype=np.float64)
    model.set_output_stride(8)
    x = np.random.default_rng(108).standard_normal((2, 3, 33, 33))
    result = check_module(model, x, rtol=1e-6, eps=1e-6, full_limit=4, samples=3, rng=np.random.default_rng(7))
    assert {row.name for row in result.rows} == {"input"} | {n for n, _ in model.named_parameters()}


def test_rates_that_do_not_scale_are_refused_before_any_change():
    model = small(16, rates=(1, 2, 3))
    before = repr(model)
    with pytest.raises(ValueError, match="rate 1 at output stride 16 becomes 0.5 at 32"):
        model.set_output_stride(32)
    assert repr(model) == before and model.output_stride == 16
    with pytest.raises(ValueError, match="output_stride must be one of"):
        model.set_output_stride(4)


def test_backbone_alone_switches():
    from minideeplab.models import densenet121
    net = densenet121(32, rng=np.random.default_rng(0))
    net.set_output_stride(8)
    assert net.output_stride == 8 and net.features.denseblock4.denselayer1.conv2.dilation == (4, 4)
    assert net.features.denseblock4.denselayer1.conv2.padding == (4, 4)


def test_min_input_size_follows_the_stride():
    model = small(16).eval()
    assert model.min_input_size == 13
    model.set_output_stride(32)
    assert model.min_input_size == model.backbone.min_input_size == 29
    with pytest.raises(ValueError, match="29"):                 # refused by name, not deep inside a layer
        model(np.zeros((1, 3, 20, 20), np.float32))
    model.set_output_stride(8)
    assert model.min_input_size == 5
    assert model(np.zeros((1, 3, 8, 8), np.float32)).shape == (1, 1, 8, 8)


# -- the textbook tier -------------------------------------------------------------------------------------------


def textbook_small(os_, seed=0, **kw):
    """A textbook small model (float64) with trained-looking batch norms."""
    from minideeplab import textbook as tb
    model = tb.build_deeplab(DeepLabConfig.small(output_stride=os_, **kw), rng=np.random.default_rng(seed),
                             dtype=np.float64)
    rng = np.random.default_rng(seed + 100)
    for m in model.modules():
        if isinstance(m, tb.BatchNorm2d):
            m.running_mean[...] = rng.normal(0, 0.2, m.num_features)
            m.running_var[...] = rng.uniform(0.5, 1.5, m.num_features)
            m.weight.data[...] = rng.uniform(0.5, 1.5, m.num_features)
            m.bias.data[...] = rng.normal(0, 0.2, m.num_features)
    return model


def test_textbook_round_trip_gives_identical_logits():
    from minideeplab import textbook as tb
    model = textbook_small(16, dropout=0.0).eval()
    x = np.random.default_rng(1).standard_normal((2, 3, 45, 38))
    before, text = model(x), repr(model)
    model.set_output_stride(8)
    at8 = model(x)
    assert model.output_stride == model.backbone.output_stride == 8 and model.rates == (12, 24, 36)
    assert isinstance(model.backbone.features.transition2.pool, tb.Identity)
    assert not np.allclose(at8, before)                       # the switch changed the network...
    model.set_output_stride(16)
    np.testing.assert_array_equal(model(x), before)            # ...and switching back restores it exactly
    assert repr(model) == text
    # the pooling put back is the textbook's own class, not the fast tier's
    assert type(model.backbone.features.transition2.pool) is tb.AvgPool2d
    # the fast tier's function, given a textbook model, builds the same network as the textbook's method
    other = textbook_small(16, dropout=0.0).eval()
    other(x)                                                   # the upsamplers' sizes, as in model
    set_output_stride(other, 8)
    model.set_output_stride(8)
    assert repr(other) == repr(model) and other.config == model.config
    assert type(other.backbone.features.transition1.pool) is tb.AvgPool2d
    set_output_stride(other, 16)
    assert type(other.backbone.features.transition2.pool) is tb.AvgPool2d
    np.testing.assert_array_equal(other(x), before)


def test_textbook_refuses_rates_that_do_not_scale_before_any_change():
    model = textbook_small(16, rates=(1, 2, 3))
    before = repr(model)
    with pytest.raises(ValueError, match="rate 1 at output stride 16 becomes 0.5 at 32"):
        model.set_output_stride(32)
    with pytest.raises(ValueError, match="output_stride must be one of"):
        model.set_output_stride(4)
    assert repr(model) == before and model.output_stride == model.backbone.output_stride == 16


@pytest.mark.parametrize("start, target", [(16, 8), (16, 32), (8, 16)])
def test_textbook_switched_equals_textbook_built(start, target):
    from minideeplab import textbook as tb
    model = textbook_small(start).eval()
    model.set_output_stride(target)
    built = tb.build_deeplab(DeepLabConfig.small(output_stride=target), rng=np.random.default_rng(9),
                             dtype=np.float64).eval()
    built.load_state_dict(model.state_dict())
    assert built.config == model.config and repr(built) == repr(model)
    x = np.random.default_rng(2).standard_normal((2, 3, 64, 64))
    np.testing.assert_array_equal(model(x), built(x))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_textbook_switched_equals_fast_switched(train):
    """Both tiers trained at 16 and switched to 8: the same logits, input gradient, parameter gradients and running
    statistics to float64 rounding."""
    from test_textbook_model import compare_models, pair
    textbook, fast, x, dlogits = pair(16, train)
    for m in (textbook, fast):
        m.set_output_stride(8)
    dilations = [[(n, m.dilation, m.padding) for n, m in net.named_modules() if n.endswith("conv2") or
                  n.startswith("head.aspp.branches.") and n.endswith(".conv")] for net in (textbook, fast)]
    assert dilations[0] == dilations[1] and textbook.rates == fast.rates == (12, 24, 36)
    errors = compare_models(textbook, fast, x, dlogits)
    assert errors["logits"] < 1e-12
    with pytest.raises(AssertionError, match="differs"):       # the comparison sees a stride mismatch
        textbook.set_output_stride(16)
        compare_models(textbook, fast, x, dlogits)


# -- the ASPP ablations --------------------------------------------------------------------------------------------


def test_default_state_dict_is_unchanged():
    model = build_deeplab(DeepLabConfig.small(), rng=np.random.default_rng(0))
    keys = [k for k in model.state_dict() if k.startswith("head.aspp.")]
    assert [k for k in keys if k.startswith("head.aspp.branches.")][-1].startswith("head.aspp.branches.3.")
    assert "head.aspp.pooling.conv.weight" in keys
    assert model.state_dict()["head.aspp.project.conv.weight"].shape == (16, 5 * 16, 1, 1)
    assert "image_pooling" not in DeepLabConfig().to_dict()       # a default model's saved config is as before


@pytest.mark.parametrize("rates, pooling, branches", [((), False, 1), ((1, 2, 3), False, 4), ((2,), True, 3)])
def test_aspp_ablations(rates, pooling, branches):
    config = DeepLabConfig.small(rates=rates, image_pooling=pooling)
    assert DeepLabConfig.from_dict(config.to_dict()) == config
    model = build_deeplab(config, rng=np.random.default_rng(0))
    aspp = model.head.aspp
    assert len(aspp.branches) == 1 + len(rates) and (aspp.pooling is not None) == pooling
    assert aspp.project.conv.weight.shape == (16, branches * 16, 1, 1)
    assert model(np.zeros((2, 3, 40, 40), np.float32)).shape == (2, 1, 40, 40)
    model.set_output_stride(8)                 # works without atrous or pooling branches too
    rng = np.random.default_rng(5)
    aspp = ASPP(6, 4, rates=rates, dropout=0.3, rng=rng, dtype=np.float64, image_pooling=pooling)
    check_module(aspp, rng.standard_normal((2, 6, 5, 7)), rtol=1e-6, full_limit=200, rng=np.random.default_rng(2))
