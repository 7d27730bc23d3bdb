"""Receptive fields: analytic table vs hand arithmetic, output sizes vs the conv formula, exact region vs the
gradient that actually reaches the input (empirical), on conv stacks with dilation, DenseNet and DeepLabV3."""
import numpy as np
import pytest

from minideeplab import nn
from minideeplab.analysis import empirical_receptive_field, receptive_field, receptive_field_region
from minideeplab.models import DeepLabConfig, build_deeplab, densenet121, set_fused


# ---------------------------------------------------------------------------------------------------------------
# DenseNet121 written out as a layer list, with the recurrences spelled out here (not by the code under test)
def densenet121_layers(output_stride):
    """(name, kernel, stride, padding, dilation) of every spatial layer on the deepest path of DenseNet121."""
    pooled = {32: (True, True, True), 16: (True, True, False), 8: (True, False, False)}[output_stride]
    dilation = {32: (1, 1, 1, 1), 16: (1, 1, 1, 2), 8: (1, 1, 2, 4)}[output_stride]
    layers = [("conv0", 7, 2, 3, 1), ("pool0", 3, 2, 1, 1)]
    for b, n in enumerate((6, 12, 24, 16)):
        for i in range(n):
            layers.append((f"denseblock{b + 1}.denselayer{i + 1}.conv1", 1, 1, 0, 1))
            layers.append((f"denseblock{b + 1}.denselayer{i + 1}.conv2", 3, 1, dilation[b], dilation[b]))
        if b < 3:
            layers.append((f"transition{b + 1}.conv", 1, 1, 0, 1))
            if pooled[b]:
                layers.append((f"transition{b + 1}.pool", 2, 2, 0, 1))
    return layers


def hand_arithmetic(layers, size):
    """r_out = r_in + d(k-1) j_in, j_out = s j_in, n_out = floor((n + 2p - d(k-1) - 1)/s) + 1, per layer."""
    r, j, n, out = 1, 1, size, {}
    for name, k, s, p, d in layers:
        r = r + d * (k - 1) * j
        j = j * s
        n = (n + 2 * p - d * (k - 1) - 1) // s + 1
        out[name] = (r, j, n)
    return out


@pytest.mark.parametrize("output_stride, literal_rf", [(32, 2071), (16, 2055), (8, 2047)])
def test_densenet121_rf_and_jump_match_hand_arithmetic(output_stride, literal_rf):
    table = receptive_field(densenet121(output_stride=output_stride, rng=np.random.default_rng(0)), 224)
    expected = hand_arithmetic(densenet121_layers(output_stride), 224)
    for name, (r, j, n) in expected.items():
        row = table.at(f"features.{name}")
        assert (row.rf, row.jump, row.size) == ((r, r), (j, j), (n, n)), name
    # the block outputs are joins: their field is the deepest path's (the last layer's 3x3 conv)
    for b, n_layers in enumerate((6, 12, 24, 16)):
        last = expected[f"denseblock{b + 1}.denselayer{n_layers}.conv2"]
        assert table.at(f"features.denseblock{b + 1}").rf == (last[0], last[0])
    r, j, n = list(expected.values())[-1]
    assert table.final.rf == (r, r) and table.final.jump == (j, j) and table.final.size == (n, n)
    # the hand arithmetic itself, against the numbers worked out on paper in docs/receptive_field.md
    assert (r, j) == (literal_rf, output_stride)


# ---------------------------------------------------------------------------------------------------------------
def record_shapes(model):
    """Patch every conv/pool instance to record (input shape, output shape) of its last forward (layer by layer:
    a fused BN → ReLU → 1×1 conv head would not call its conv's forward)."""
    set_fused(model, False)
    seen = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            def wrapped(x, _f=m.forward, _name=name):
                out = _f(x)
                seen[_name] = (x.shape, out.shape)
                return out
            m.forward = wrapped
    return seen


@pytest.mark.parametrize("size", [(64, 64), (61, 50)])
def test_output_sizes_match_forward_and_conv_formula(size):
    model = build_deeplab(DeepLabConfig.small(), rng=np.random.default_rng(0)).eval()
    table = receptive_field(model, size)
    seen = record_shapes(model)
    out = model(np.random.default_rng(1).standard_normal((1, 3, *size)).astype(np.float32))
    assert table.final.size == tuple(out.shape[2:]) == size
    assert len(seen) == sum(1 for r in table if r.kind in ("conv", "maxpool", "avgpool"))
    for name, (x_shape, y_shape) in seen.items():
        row = table.at(name)
        for axis in (0, 1):
            k, s, p, d = row.kernel[axis], row.stride[axis], row.padding[axis], row.dilation[axis]
            formula = (x_shape[2 + axis] + 2 * p - d * (k - 1) - 1) // s + 1
            assert row.size[axis] == y_shape[2 + axis] == formula, name


def test_joins_name_the_path_with_the_largest_field():
    model = build_deeplab(DeepLabConfig.small(), rng=np.random.default_rng(0))
    table = receptive_field(model, 64)
    block = table.at("backbone.features.denseblock2")
    assert block.kind == "join" and block.note.endswith("denseblock2.denselayer2.conv2")
    aspp = table.at("head.aspp.branches.3")
    concat = next(r for r in table if r.name == "head.aspp.concat")
    assert concat.note == "max via head.aspp.branches.3.conv"   # rate 18 is the widest branch
    assert concat.rf == aspp.rf
    gap = table.at("head.aspp.pooling.gap")
    assert gap.note == "whole map" and gap.size == (1, 1)


# ---------------------------------------------------------------------------------------------------------------
def positive(model):
    """No gradient can cancel: positive weights, unit BN (eval mode, zero mean), so every ReLU stays open for a
    positive input and every path adds a positive amount."""
    for name, p in model.named_parameters():
        p.data[...] = np.abs(p.data) + 0.01 if not name.endswith("bias") else 0.0
    return model.eval()


def dilated_stack(rng):
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=2, dilation=2, rng=rng, dtype=np.float64), nn.BatchNorm2d(3, dtype=np.float64),
        nn.ReLU(), nn.AvgPool2d(2, 2),
        nn.Conv2d(3, 3, 3, padding=3, dilation=3, rng=rng, dtype=np.float64), nn.ReLU(),
        nn.Conv2d(3, 2, 3, stride=2, padding=1, rng=rng, dtype=np.float64), nn.ReLU(),
        nn.Conv2d(2, 2, 3, padding=4, dilation=4, rng=rng, dtype=np.float64))


@pytest.mark.parametrize("position", [(0, 0), (7, 7), (3, 12), (15, 15)])
def test_dilated_stack_empirical_equals_exact_region(position, rng):
    net = positive(dilated_stack(rng))
    x = rng.uniform(0.5, 1.5, (1, 2, 64, 64))
    emp = empirical_receptive_field(net, 64, position=position, x=x)
    region = receptive_field_region(net, 64, position=position)
    assert emp.output_size == (16, 16)
    np.testing.assert_array_equal(emp.mask, region.mask)   # holes of the dilated taps included
    assert emp.bbox == region.bbox
    # hand arithmetic: r = 1 + 4*1 -> 5, +1*1 (pool) -> 6, j=2, +6*2 -> 18, +2*2 -> 22, j=4, +8*4 -> 54
    table = receptive_field(net, 64)
    assert table.final.rf == (54, 54) and table.final.jump == (4, 4)
    top, left, bottom, right = region.bbox
    if position == (7, 7):  # an interior unit: nothing clipped, the region spans exactly the analytic field
        assert bottom - top + 1 == right - left + 1 == 54
        assert (top + bottom) / 2 == table.final.start[0] + 7 * 4


def test_dilated_stack_random_weights_empirical_within_region(rng):
    net = dilated_stack(rng).eval()
    for position in [(0, 0), (8, 5)]:
        emp = empirical_receptive_field(net, 64, position=position, rng=rng)
        region = receptive_field_region(net, 64, position=position)
        assert not (emp.mask & ~region.mask).any()


def small_backbone(avg_pool0: bool):
    model = build_deeplab(DeepLabConfig.small(), rng=np.random.default_rng(3), dtype=np.float64)
    features = model.backbone.features
    if avg_pool0:   # max pooling routes the gradient to one winner per window; averaging routes it to all
        pool = nn.AvgPool2d(3, stride=2, padding=1)
        features._modules["pool0"] = pool          # in place: setattr would move pool0 to the end of the run order
        object.__setattr__(features, "pool0", pool)
    return model


@pytest.mark.parametrize("position", [(0, 0), (15, 14)])
def test_densenet_empirical_equals_region_without_cancellation(position, rng):
    backbone = positive(small_backbone(avg_pool0=True).backbone)
    x = rng.uniform(0.5, 1.5, (1, 3, 320, 288))
    emp = empirical_receptive_field(backbone, None, position=position, x=x)
    region = receptive_field_region(backbone, (320, 288), position=position)
    np.testing.assert_array_equal(emp.mask, region.mask)
    assert region.bbox != (0, 0, 319, 287)   # a real test: the field does not cover the whole image


@pytest.mark.parametrize("part", ["backbone", "model"])
def test_small_model_empirical_within_region(part, rng):
    model = small_backbone(avg_pool0=False).eval()
    net, size = (model.backbone, (320, 288)) if part == "backbone" else (model, (64, 64))
    for position in [(0, 0), (3, 2)] if part == "model" else [(0, 0), (15, 14)]:
        emp = empirical_receptive_field(net, size, position=position, rng=rng)
        region = receptive_field_region(net, size, position=position)
        assert emp.bbox is not None and not (emp.mask & ~region.mask).any()
    if part == "model":   # image pooling: every output pixel depends on the whole image
        assert region.bbox == (0, 0, 63, 63)


def test_empirical_leaves_parameter_gradients_alone(rng):
    net = dilated_stack(rng).eval()
    before = [p.grad.copy() for p in net.parameters()]
    empirical_receptive_field(net, 32, rng=rng)
    for b, p in zip(before, net.parameters()):
        np.testing.assert_array_equal(b, p.grad)


def test_clear_errors(rng):
    class Mystery(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="Mystery"):
        receptive_field(nn.Sequential(nn.Conv2d(1, 1, 3), Mystery()), 16)
    with pytest.raises(ValueError, match="too small"):
        receptive_field(nn.Sequential(nn.Conv2d(1, 1, 7)), 4)
    with pytest.raises(ValueError, match="outside"):
        receptive_field_region(nn.Sequential(nn.Conv2d(1, 1, 3)), 8, position=(6, 0))


def test_empirical_field_on_either_backend(device, rng):
    net = positive(dilated_stack(rng))
    x = rng.uniform(0.5, 1.5, (1, 2, 32, 32))
    host = empirical_receptive_field(net, 32, position=(2, 5), x=x)
    net.to(device)
    from minideeplab.backend import to_device
    moved = empirical_receptive_field(net, 32, position=(2, 5), x=to_device(x, device))
    assert isinstance(moved.grad_map, np.ndarray) and moved.bbox == host.bbox
    np.testing.assert_allclose(moved.grad_map, host.grad_map, rtol=1e-10, atol=1e-14)
