"""Valid atrous weights vs a brute-force count, output-stride table vs costs counted from a real forward pass,
and the figures render."""
import numpy as np
import pytest

from minideeplab import nn
from minideeplab.analysis import count_macs, count_params, output_stride_table, valid_weight_histogram
from minideeplab.analysis.figures import (
    architecture_figure,
    effective_rf_figure,
    output_stride_figure,
    save_figure,
    valid_weights_figure,
)
from minideeplab.models import DeepLabConfig, build_deeplab, set_fused


def brute_force_histogram(S, rate, k):
    """Place the k x k filter with padding = rate*(k-1)/2 at every output pixel and count in-map taps one by one."""
    counts = np.zeros(k * k + 1)
    half = (k - 1) // 2
    for i in range(S):
        for j in range(S):
            valid = 0
            for a in range(-half, half + 1):
                for b in range(-half, half + 1):
                    if 0 <= i + rate * a < S and 0 <= j + rate * b < S:
                        valid += 1
            counts[valid] += 1
    return counts / (S * S)


@pytest.mark.parametrize("S, rate, k", [(65, 1, 3), (65, 6, 3), (65, 24, 3), (65, 40, 3), (65, 64, 3), (65, 70, 3),
                                        (17, 3, 5), (9, 2, 1), (12, 5, 3)])
def test_valid_weight_histogram_matches_brute_force(S, rate, k):
    np.testing.assert_allclose(valid_weight_histogram(S, rate, k), brute_force_histogram(S, rate, k), atol=1e-12)


def test_large_rates_degenerate_to_the_centre_tap():
    assert valid_weight_histogram(65, 65)[1] == 1.0
    h = valid_weight_histogram(65, 1)
    assert h[9] == 63 * 63 / 65 ** 2 and h[4] == 4 / 65 ** 2   # interior vs the four corners
    with pytest.raises(ValueError, match="odd"):
        valid_weight_histogram(65, 6, kernel_size=4)


def measured_macs(model, x):
    """Multiply-adds from the shapes each Conv2d actually sees in a forward pass (run layer by layer: a fused
    BN → ReLU → 1×1 conv head does the same GEMM without calling its conv's forward)."""
    set_fused(model, False)
    total = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            def wrapped(inp, _f=m.forward, _m=m):
                out = _f(inp)
                total.append(_m.weight.data.size * out.shape[2] * out.shape[3])   # C_out*C_in*kh*kw * Ho*Wo
                return out
            m.forward = wrapped
    model(x)
    return sum(total)


def test_output_stride_table_against_a_forward_pass():
    configs = {}

    def builder(os_):
        configs[os_] = build_deeplab(DeepLabConfig.small(output_stride=os_), rng=np.random.default_rng(0)).eval()
        return configs[os_]

    table = output_stride_table(builder, 64)
    assert [r.output_stride for r in table] == [32, 16, 8]
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    for row in table:
        model = configs[row.output_stride]
        feats = model.backbone(x)
        assert row.feature_size == tuple(feats.shape[2:]) == (64 // row.output_stride,) * 2
        assert row.backbone_jump == (row.output_stride,) * 2
        assert row.params == sum(p.data.size for p in model.parameters())
        assert row.total_macs == measured_macs(model, x)
        assert row.backbone_macs == measured_macs(model.backbone, x)
    # same parameters at every stride (atrous convolution adds none); more work at a smaller stride
    assert len({r.params for r in table}) == 1
    assert table[0].total_macs < table[1].total_macs < table[2].total_macs
    assert "OS" in str(table)


def test_count_helpers_on_a_plain_stack(rng):
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, rng=rng), nn.ReLU(), nn.Conv2d(4, 2, 1, rng=rng))
    assert count_macs(net, 10) == 3 * 9 * 4 * 25 + 4 * 2 * 25
    assert count_params(net) == 3 * 9 * 4 + 4 + 4 * 2 + 2


def test_figures_render(tmp_path):
    model = build_deeplab(DeepLabConfig.small(), rng=np.random.default_rng(0))
    figs = {"valid.png": valid_weights_figure(17),
            "os.png": output_stride_figure(lambda os_: build_deeplab(DeepLabConfig.small(output_stride=os_)).backbone,
                                           64),
            "arch.png": architecture_figure(model, 64),
            "erf.png": effective_rf_figure({"small": model.backbone.eval()}, 64)}
    for name, fig in figs.items():
        path = save_figure(fig, tmp_path / name)
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(figs)   # no temporary file left behind
