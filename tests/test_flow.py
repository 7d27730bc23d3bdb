"""analysis.flow: one record per layer of a step, statistics that match the step's own arrays, plots written."""
import math

import numpy as np
import pytest

from minideeplab import textbook
from minideeplab.analysis.flow import (
    default_layers,
    format_records,
    plot_activation_histograms,
    plot_gradient_flow,
    record_step,
    stage_of,
)
from minideeplab.losses import BCEWithLogitsLoss
from minideeplab.models import DeepLabConfig, build_deeplab

STATS = ("act_mean", "act_std", "act_min", "act_max", "act_zero_fraction", "grad_norm", "grad_rms", "grad_mean",
         "grad_std")


def data(size=40):
    rng = np.random.default_rng(3)
    return (rng.standard_normal((2, 3, size, size)).astype(np.float32),
            (rng.random((2, 1, size, size)) < 0.3).astype(np.float32))


@pytest.fixture(scope="module")
def fast_records():
    model = build_deeplab(DeepLabConfig.small(), rng=np.random.default_rng(0))
    x, target = data()
    before = {k: np.array(b, copy=True) for k, b in model.named_buffers()}
    records = record_step(model, x, target, BCEWithLogitsLoss())
    return model, x, target, before, records


def test_one_row_per_layer_in_module_order_with_finite_statistics(fast_records):
    model, _, _, _, records = fast_records
    layers = default_layers(model)
    assert [r.name for r in records] == [n for n, _ in layers] and len(records) == 89   # 90 leaves less 1 Identity
    assert [r.index for r in records] == list(range(len(records)))
    for r, (_, m) in zip(records, layers):
        assert r.type == type(m).__name__
        for stat in STATS:
            assert math.isfinite(getattr(r, stat)), (r.name, stat)
        assert r.act_hist is not None and r.grad_hist is not None and r.act_hist[0].sum() == math.prod(r.shape)
        if m._parameters:
            assert math.isfinite(r.param_grad_norm) and r.param_grad_norm > 0 and math.isfinite(r.update_ratio)
        else:
            assert math.isnan(r.param_grad_norm) and math.isnan(r.update_ratio)
    relu = next(r for r in records if r.type == "ReLU")
    assert 0.2 < relu.act_zero_fraction < 0.8 and relu.act_min == 0.0


def test_statistics_are_those_of_the_steps_arrays(fast_records):
    """The last layer's output is the logits and its dL/d(output) the loss's gradient, both recomputed here
    without hooks; conv0's parameter gradient is what the step left in .grad."""
    model, x, target, _, records = fast_records
    loss_fn = BCEWithLogitsLoss()
    fresh = build_deeplab(DeepLabConfig.small(), rng=np.random.default_rng(0))
    logits = fresh(x).astype(np.float64)
    loss = float(loss_fn(logits.astype(np.float32), target))
    dlogits = loss_fn.backward().astype(np.float64)
    last = records[-1]
    assert last.name == "upsample" and last.shape == logits.shape
    assert last.act_mean == pytest.approx(logits.mean(), rel=1e-4)
    assert last.act_std == pytest.approx(logits.std(), rel=1e-4)
    assert last.act_max == pytest.approx(logits.max(), rel=1e-5)
    assert last.grad_norm == pytest.approx(np.linalg.norm(dlogits), rel=1e-5)
    assert last.grad_rms == pytest.approx(np.sqrt((dlogits ** 2).mean()), rel=1e-5)
    assert records.loss == pytest.approx(loss, rel=1e-5)
    conv0 = model.backbone.features.conv0
    assert records[0].param_grad_norm == pytest.approx(float(np.linalg.norm(conv0.weight.grad)), rel=1e-5)
    assert records[0].update_ratio == pytest.approx(records[0].param_grad_norm / np.linalg.norm(conv0.weight.data),
                                                    rel=1e-6)


def test_running_statistics_are_put_back_and_hooks_removed(fast_records):
    model, _, _, before, _ = fast_records
    for k, b in model.named_buffers():
        assert np.array_equal(b, before[k]), k
    assert not any({"forward", "backward", "_hooks"} & m.__dict__.keys() for m in model.modules())


def test_textbook_model_and_chosen_layers():
    model = textbook.build_deeplab(DeepLabConfig.small(), rng=np.random.default_rng(0))
    x, target = data()
    names = ["backbone.features.conv0", "backbone.features.denseblock1", "head.classifier"]
    records = record_step(model, x, target, BCEWithLogitsLoss(), layers=names)
    assert [r.name for r in records] == names and records[1].type == "DenseBlock"
    assert all(math.isfinite(r.grad_norm) for r in records)
    convs = record_step(model, x, target, BCEWithLogitsLoss(), layers=lambda n, m: type(m).__name__ == "Conv2d")
    assert {r.type for r in convs} == {"Conv2d"} and len(convs) > 10
    with pytest.raises(ValueError, match=r"no module named 'head.nothing'"):
        record_step(model, x, target, BCEWithLogitsLoss(), layers=["head.nothing"])


def test_plots_write_png_files_and_draw_into_axes(fast_records, tmp_path):
    from matplotlib.figure import Figure
    records = fast_records[-1]
    for quantity in ("grad_norm", "grad_rms", "update_ratio"):
        path = plot_gradient_flow(records, tmp_path / f"flow_{quantity}.png", quantity=quantity, title=quantity)
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    for which in ("activation", "gradient"):
        path = plot_activation_histograms(records, tmp_path / f"hist_{which}.png", which=which)
        assert (tmp_path / f"hist_{which}.png").stat().st_size > 1000 and str(path).endswith(".png")
    ax = Figure().add_subplot()
    assert plot_gradient_flow(records, ax) is ax and len(ax.collections) >= 5     # one scatter per layer type
    fig = plot_activation_histograms(records, Figure(), names=["backbone.features.relu0", "upsample"], cols=2)
    assert len(fig.axes) == 2
    with pytest.raises(ValueError, match=r"quantity must be one of"):
        plot_gradient_flow(records, ax, quantity="speed")
    with pytest.raises(ValueError, match=r"no activation histogram recorded for 'nope'"):
        plot_activation_histograms(records, Figure(), names=["nope"])
    table = format_records(records, every=10)
    assert len(table.splitlines()) == 1 + len(records[::10]) and "conv0" in table


def test_stage_labels():
    assert stage_of("backbone.features.denseblock3.denselayer2.conv1") == "denseblock3"
    assert stage_of("backbone.features.norm0") == "stem"
    assert stage_of("head.aspp.branches.1.conv") == "aspp"
    assert stage_of("upsample") == "upsample"
