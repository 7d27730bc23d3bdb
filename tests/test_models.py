"""The network: structure, names, shapes at every output stride, the dense-block buffer, batch size 1, summary."""
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from minideeplab import nn
from minideeplab.gradcheck import check_module
from minideeplab.models import (
    ASPP,
    DeepLabConfig,
    DeepLabV3,
    DenseBlock,
    DenseNet,
    build_deeplab,
    deeplabv3_densenet121,
    densenet121,
    summary,
    summary_rows,
)

FIXTURE = Path(__file__).parent / "fixtures" / "densenet121_keys.txt"


def small(os_=16, dtype=np.float32, **kw):
    return build_deeplab(DeepLabConfig.small(output_stride=os_, **kw), rng=np.random.default_rng(0), dtype=dtype)


# -- names ----------------------------------------------------------------------------------------------------
def test_backbone_keys_equal_torchvision_densenet121_features():
    expected = [line.strip() for line in FIXTURE.read_text().splitlines() if line.strip() and line[0] != "#"]
    assert len(expected) == 725
    for os_ in (8, 16, 32):   # the output stride never changes names
        keys = list(densenet121(output_stride=os_, rng=np.random.default_rng(0)).state_dict())
        assert keys == expected


def test_densenet121_parameter_count_and_channels():
    net = densenet121(rng=np.random.default_rng(0))
    # torchvision's densenet121 has 7,978,856 parameters, of which the classifier Linear(1024, 1000) has 1,025,000
    assert sum(p.data.size for p in net.parameters()) == 7_978_856 - 1_025_000
    assert net.out_channels == 1024
    assert [n for n, _ in net.features.named_children()] == [
        "conv0", "norm0", "relu0", "pool0", "denseblock1", "transition1", "denseblock2", "transition2",
        "denseblock3", "transition3", "denseblock4", "norm5", "relu5"]


def test_head_keys_and_structure():
    model = small()
    keys = [k for k in model.state_dict() if k.startswith("head.")]
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    expected = []
    for i in range(4):
        expected += [f"head.aspp.branches.{i}.conv.weight"] + [f"head.aspp.branches.{i}.bn.{s}" for s in bn]
    expected += ["head.aspp.pooling.conv.weight"] + [f"head.aspp.pooling.bn.{s}" for s in bn]
    expected += ["head.aspp.project.conv.weight"] + [f"head.aspp.project.bn.{s}" for s in bn]
    expected += ["head.classifier.weight", "head.classifier.bias"]
    assert keys == expected
    aspp = model.head.aspp
    assert [b.conv.dilation for b in aspp.branches] == [(1, 1), (6, 6), (12, 12), (18, 18)]
    assert [b.conv.padding for b in aspp.branches] == [(0, 0), (6, 6), (12, 12), (18, 18)]
    assert all(b.conv.bias is None for b in aspp.branches) and aspp.project.conv.bias is None
    assert model.head.classifier.bias is not None
    assert aspp.project.conv.in_channels == 5 * 16 and aspp.project.dropout.p == 0.1


@pytest.mark.parametrize("os_, rates", [(8, (12, 24, 36)), (16, (6, 12, 18)), (32, (3, 6, 9))])
def test_default_rates_scale_with_output_stride(os_, rates):
    model = small(os_)
    assert model.rates == rates
    assert [b.conv.dilation[0] for b in list(model.head.aspp.branches)[1:]] == list(rates)


@pytest.mark.parametrize("os_, pools, dilations", [
    (32, ("AvgPool2d", "AvgPool2d", "AvgPool2d"), (1, 1, 1, 1)),
    (16, ("AvgPool2d", "AvgPool2d", "Identity"), (1, 1, 1, 2)),
    (8, ("AvgPool2d", "Identity", "Identity"), (1, 1, 2, 4)),
])
def test_atrous_layout_per_output_stride(os_, pools, dilations):
    f = densenet121(output_stride=os_, rng=np.random.default_rng(0)).features
    assert tuple(type(getattr(f, f"transition{i}").pool).__name__ for i in (1, 2, 3)) == pools
    for b, d in zip(range(1, 5), dilations):
        block = getattr(f, f"denseblock{b}")
        assert {layer.conv2.dilation for layer in block.children()} == {(d, d)}
        assert {layer.conv2.padding for layer in block.children()} == {(d, d)}


@pytest.mark.parametrize("bad", [4, 12, 64, None, "16"])
def test_bad_output_stride_is_a_value_error(bad):
    with pytest.raises(ValueError, match="output_stride must be one of"):
        DenseNet(output_stride=bad)
    with pytest.raises(ValueError, match="output_stride must be one of"):
        DeepLabConfig(output_stride=bad)


# -- shapes ---------------------------------------------------------------------------------------------------
# Backbone output side per (input side, output stride), worked out by hand: conv0 and pool0 round up
# (ceil(H/2) each), every 2x2 average pool rounds down. E.g. 97 -> 49 -> 25 -> 12 -> 6 -> 3.
BACKBONE_SIDE = {64: {8: 8, 16: 4, 32: 2}, 97: {8: 12, 16: 6, 32: 3}, 128: {8: 16, 16: 8, 32: 4},
                 256: {8: 32, 16: 16, 32: 8}}


@pytest.mark.parametrize("os_", [8, 16, 32])
@pytest.mark.parametrize("side", [64, 97, 128, 256])
def test_output_shapes_small_config(side, os_):
    model = small(os_).eval()
    x = np.zeros((1, 3, side, side + 3), np.float32)   # also non-square
    rows = {name: (shape, stride) for name, shape, _, stride in summary_rows(model, x.shape)}
    s = BACKBONE_SIDE[side][os_]
    assert rows["backbone.features.relu5"][0][2] == s
    assert rows["backbone.features.relu5"][1] == os_           # nominal stride
    assert rows["head.classifier"][0] == (1, 1, s, rows["head.classifier"][0][3])
    assert model(x).shape == (1, 1, side, side + 3)


@pytest.mark.parametrize("os_", [8, 16, 32])
def test_full_backbone_stride_and_channels(os_):
    net = densenet121(output_stride=os_, rng=np.random.default_rng(0)).eval()
    out = net(np.zeros((1, 3, 97, 64), np.float32))
    assert out.shape == (1, 1024, BACKBONE_SIDE[97][os_], BACKBONE_SIDE[64][os_])


def test_deeplab_any_input_size_and_predict():
    model = small(8, num_classes=2).eval()
    x = np.random.default_rng(1).standard_normal((2, 3, 45, 70)).astype(np.float32)
    logits = model(x)
    assert logits.shape == (2, 2, 45, 70) and logits.dtype == np.float32
    proba = model.predict_proba(x)
    np.testing.assert_allclose(proba, 1 / (1 + np.exp(-logits.astype(np.float64))), rtol=1e-5)
    mask = model.predict(x, threshold=0.3)
    assert mask.dtype == bool and np.array_equal(mask, proba > 0.3)


def test_input_checks_name_the_model():
    model = small()
    with pytest.raises(ValueError, match=r"DeepLabV3: expected 3 input channels, got 4"):
        model(np.zeros((2, 4, 32, 32), np.float32))
    with pytest.raises(ValueError, match=r"DeepLabV3: expected input of shape \(N, C, H, W\)"):
        model(np.zeros((3, 32, 32), np.float32))
    with pytest.raises(TypeError, match="input dtype float64 does not match parameter dtype float32"):
        model(np.zeros((2, 3, 32, 32)))
    with pytest.raises(RuntimeError, match="backward called before forward"):
        small().backward(np.zeros((2, 1, 32, 32), np.float32))


def test_backbone_mismatch_is_rejected():
    with pytest.raises(ValueError, match="backbone was built with output_stride=32"):
        DeepLabV3(DenseNet(8, (2, 2, 2, 2), 16, 2, output_stride=32), output_stride=16)


# -- batch size 1 ---------------------------------------------------------------------------------------------
def test_batch_of_one_in_training_is_a_clear_error_and_works_in_eval():
    model = small(16)
    x = np.random.default_rng(2).standard_normal((1, 3, 40, 40)).astype(np.float32)
    with pytest.raises(ValueError, match=r"ASPP image-pooling branch \(head\.aspp\.pooling\.bn\).*batch size >= 2"
                                          r".*model\.eval\(\)"):
        model(x)
    before = model.head.aspp.pooling.bn.running_mean.copy()
    out = model.eval()(x)
    assert out.shape == (1, 1, 40, 40) and np.isfinite(out).all()
    np.testing.assert_array_equal(model.head.aspp.pooling.bn.running_mean, before)
    model.train()
    out2 = model(np.concatenate([x, x[:, :, ::-1]]))
    assert np.isfinite(out2).all()


# -- the dense block's one buffer -----------------------------------------------------------------------------
def test_dense_block_layers_read_views_of_one_buffer():
    rng = np.random.default_rng(3)
    block = DenseBlock(4, 6, 2, 3, rng=rng, dtype=np.float64)
    seen, seen_stats = [], []
    for layer in block.children():   # record what each layer received
        def spy(x, stats=None, _forward=layer.forward):
            seen.append(x)
            seen_stats.append(stats)
            return _forward(x, stats)
        layer.forward = spy
    x = rng.standard_normal((2, 6, 5, 5))
    x_before = x.copy()
    out = block(x)
    assert out.shape == (2, 6 + 4 * 3, 5, 5)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(out[:, :6], x)
    assert len(seen) == 4
    for i, inp in enumerate(seen):
        assert inp.shape[1] == 6 + 3 * i
        assert np.shares_memory(inp, out), f"layer {i + 1} got a copy, not a view of the block buffer"
    # training mode: each layer got the batch statistics of its prefix, as views of one shared centred buffer
    first = seen_stats[0][0]
    for inp, (centered, mean, var) in zip(seen, seen_stats):
        assert np.shares_memory(centered, first) or centered is first
        n = inp.shape[0] * inp.shape[2] * inp.shape[3]
        np.testing.assert_allclose(mean, inp.mean(axis=(0, 2, 3)), rtol=1e-12)
        np.testing.assert_allclose(var, inp.var(axis=(0, 2, 3)), rtol=1e-12)
        np.testing.assert_allclose(centered, inp - inp.mean(axis=(0, 2, 3), keepdims=True), atol=1e-12)
        assert n == 50
    assert block.denselayer4.norm1.centered.base is not None        # a view, not a copy per layer
    assert np.shares_memory(block.denselayer4.norm1.centered, block.denselayer2.norm1.centered)
    # the buffer holds exactly what a naive concatenation would have produced (each layer computing its own
    # batch statistics there)
    feats = [x]
    for layer in block.children():
        feats.append(layer(np.concatenate(feats, axis=1)))
    np.testing.assert_allclose(out, np.concatenate(feats, axis=1), rtol=1e-12)


def test_batchnorm_does_not_mutate_the_prefix_it_reads():
    block = DenseBlock(3, 4, 2, 2, rng=np.random.default_rng(0), dtype=np.float64)
    x = np.random.default_rng(1).standard_normal((2, 4, 6, 6))
    out = block(x)
    snapshot = out.copy()
    block.backward(np.ones_like(out))
    np.testing.assert_array_equal(out, snapshot)


class _Stub(nn.Module):
    """Stands in for a DenseLayer: no caches, so memory measurements see only the concatenation scheme."""

    def __init__(self, growth):
        super().__init__()
        self.growth = growth

    def forward(self, x, stats=None):
        return np.ones((x.shape[0], self.growth) + x.shape[2:], x.dtype)


def test_dense_block_allocates_its_concatenation_once():
    L, C0, k, shape = 24, 64, 32, (2, 64, 24, 24)
    block = DenseBlock(L, C0, 1, k)
    for i in range(L):
        setattr(block, f"denselayer{i + 1}", _Stub(k))
    x = np.zeros(shape, np.float32)
    buffer_bytes = 2 * (C0 + L * k) * 24 * 24 * 4
    layer_bytes = 2 * k * 24 * 24 * 4

    def naive():
        feats = [x]
        for layer in block.children():
            feats.append(layer(np.concatenate(feats, axis=1)))
        return np.concatenate(feats, axis=1)

    peaks = {}
    for name, fn in (("buffer", lambda: block.eval()(x)), ("naive", naive), ("train", lambda: block.train()(x))):
        tracemalloc.start()
        out = fn()
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert out.shape == (2, C0 + L * k, 24, 24)
        del out
    # one buffer plus one layer's output in flight (and small bookkeeping), never a second concatenation
    assert peaks["buffer"] < buffer_bytes + 2 * layer_bytes + 64 * 1024, peaks
    # naive concatenation holds the feature list and a full concatenated copy at the same time
    assert peaks["naive"] > 1.8 * buffer_bytes, peaks
    # training adds ONE buffer of centred values (SharedBatchStatistics), not one per layer
    assert peaks["train"] < 2 * buffer_bytes + 3 * layer_bytes + 64 * 1024, peaks


# -- config, summary, devices ---------------------------------------------------------------------------------
def test_config_round_trip_and_small():
    c = DeepLabConfig.small(output_stride=8, num_classes=3)
    assert (c.growth_rate, c.block_config, c.num_init_features, c.bn_size, c.aspp_channels) == (8, (2, 2, 2, 2),
                                                                                               16, 2, 16)
    assert c.resolved_rates == (12, 24, 36)
    d = c.to_dict()
    assert d["block_config"] == [2, 2, 2, 2]
    assert DeepLabConfig.from_dict(d) == c
    with pytest.raises(ValueError, match=r"unknown fields \['depth'\]"):
        DeepLabConfig.from_dict({**d, "depth": 3})
    model = deeplabv3_densenet121(num_classes=2, output_stride=8, rng=np.random.default_rng(0))
    assert model.config == DeepLabConfig(num_classes=2, output_stride=8)
    assert model.rates == (12, 24, 36)


def test_summary_table():
    model = small(16)
    text = summary(model, (2, 3, 64, 64))
    lines = text.splitlines()
    row = next(line for line in lines if line.startswith("backbone.features.denseblock4"))
    assert "(2, 32, 4, 4)" in row and row.split()[-1] == "16"
    assert next(line for line in lines if line.startswith("upsample")).split()[-1] == "1"
    assert "(2, 1, 64, 64)" in text
    total = sum(p.data.size for p in model.parameters())
    assert lines[-1].split()[-1] == f"{total:,}"
    assert model.training   # summary restores the mode


def test_float64_build_and_forward_backward_on_each_backend(xp, device):
    model = small(8, dtype=np.float64).to(device)
    assert all(p.data.dtype == np.float64 for p in model.parameters())
    x = xp.asarray(np.random.default_rng(0).standard_normal((2, 3, 35, 29)))
    out = model(x)
    dx = model.backward(xp.ones_like(out))
    assert out.shape == (2, 1, 35, 29) and dx.shape == x.shape
    assert bool(xp.isfinite(dx).all())
    assert isinstance(model.head.aspp, ASPP)


def test_backward_without_the_image_gradient_leaves_parameter_gradients_unchanged():
    model = build_deeplab(DeepLabConfig.small(), rng=np.random.default_rng(0), dtype=np.float64)
    model.head.aspp.project.dropout.p = 0.0      # training-mode batch norms, the same forward twice
    x = np.random.default_rng(1).standard_normal((2, 3, 40, 36))
    dout = np.random.default_rng(2).standard_normal((2, 1, 40, 36))
    grads = []
    for input_grad in (True, False):
        model.zero_grad()
        model(x)
        dx = model.backward(dout, input_grad=input_grad)
        assert (dx is None) == (not input_grad) and (dx is None or dx.shape == x.shape)
        grads.append({n: p.grad.copy() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        np.testing.assert_array_equal(grads[1][name], g, err_msg=name)
    model(x)
    assert model.backward(dout).shape == x.shape        # the default gives dL/dx again


def test_dense_block_backward_applies_the_shared_centered_terms_once_per_channel():
    """Training-mode backward with the norm1 terms deferred (the default) equals each layer's full batch-norm
    backward added in turn (the path taken when the block has no shared statistics)."""
    rng = np.random.default_rng(11)
    block = DenseBlock(4, 5, 2, 3, rng=rng, dtype=np.float64)
    x, dout = rng.standard_normal((2, 5, 6, 7)), rng.standard_normal((2, 5 + 4 * 3, 6, 7))
    results = []
    for deferred in (True, False):
        block.zero_grad()
        block(x)
        if not deferred:
            block.shared = None
        dx = block.backward(dout)
        results.append((dx, {n: p.grad.copy() for n, p in block.named_parameters()}))
    (dx_d, g_d), (dx_l, g_l) = results
    np.testing.assert_allclose(dx_d, dx_l, rtol=1e-12, atol=1e-12)
    for name in g_l:
        np.testing.assert_allclose(g_d[name], g_l[name], rtol=1e-12, atol=1e-12, err_msg=name)


def test_dense_block_in_training_with_frozen_batch_norms():
    """A block in training mode whose batch norms were put in eval mode (frozen statistics, as in fine-tuning):
    the norm1 gradients have no centred terms then, and the gradients are still exact."""
    rng = np.random.default_rng(12)
    block = DenseBlock(3, 4, 2, 3, rng=rng, dtype=np.float64)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean[...] = rng.normal(0, 0.3, m.num_features)
            m.running_var[...] = rng.uniform(0.5, 1.5, m.num_features)
            m.eval()
    assert block.training
    check_module(block, rng.standard_normal((2, 4, 5, 6)), rtol=1e-6, full_limit=10_000, rng=np.random.default_rng(3))
