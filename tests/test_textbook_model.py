"""The textbook DeepLabV3 (``minideeplab.textbook``) against the fast model (``minideeplab.models``), PyTorch and the
package's machinery: same state-dict keys and initial weights, the same logits, input gradient, parameter gradients
and running statistics at every output stride in both modes (float64), checkpoints both ways, and it trains.

A difference is reported by state-dict name and tensor, the first one in backward order (the tensor nearest the loss
whose gradient is wrong: where a broken backward sits), e.g.
``backbone.features.denseblock2.denselayer1.conv2.weight.grad differs from the fast model: worst rel. err 3.0e-02``.
"""
import numpy as np
import pytest
from test_textbook import _random_bn, rel_err

from minideeplab import io, models
from minideeplab import textbook as tb
from minideeplab.backend import to_numpy
from minideeplab.data import SyntheticShapes
from minideeplab.gradcheck import check_module
from minideeplab.models import DeepLabConfig
from minideeplab.optim import SGD, AdamW

F64 = np.float64
TOL = 1e-9          # textbook vs fast model, float64, every tensor
SHAPE = (2, 3, 61, 50)   # odd sizes: every stage rounds; OS 32 still leaves a 2x2 map


def model_tensors(model, x, dlogits) -> dict:
    """One forward and backward: logits, then every parameter gradient in backward order (the last layer's first),
    the input gradient, and the buffers (running statistics) after the step's forward."""
    model.zero_grad()
    logits = model(x)
    dx = model.backward(dlogits)
    tensors = {"logits": logits}
    tensors.update({f"{name}.grad": p.grad.copy() for name, p in reversed(list(model.named_parameters()))})
    tensors["input.grad"] = dx
    tensors.update({name: b.copy() for name, b in model.named_buffers()})
    return tensors


def compare_models(textbook, fast, x, dlogits, tol=TOL, against="the fast model") -> dict:
    """Errors of every tensor of ``model_tensors``; raises naming the first tensor (in backward order) over ``tol``."""
    a, b = model_tensors(textbook, x, dlogits), model_tensors(fast, x, dlogits)
    assert list(a) == list(b), "the two models have different tensors"
    errors = {k: rel_err(a[k], b[k]) for k in a}
    bad = [k for k in errors if errors[k] > tol]
    if bad:
        more = f" ({len(bad) - 1} more after it: {', '.join(bad[1:4])}{' ...' if len(bad) > 4 else ''})" \
            if len(bad) > 1 else ""
        raise AssertionError(f"{bad[0]} differs from {against}: worst rel. err {errors[bad[0]]:.1e}{more}")
    return errors


def random_state(model, rng) -> dict:
    """Random batch-norm weights, biases and running statistics in the (textbook) ``model``, and its state: eval mode
    then means something, and no gradient vanishes by symmetry."""
    for m in model.modules():
        if isinstance(m, tb.BatchNorm2d):
            _random_bn(m, rng)
    return {k: v.copy() for k, v in model.state_dict().items()}


def pair(output_stride, train, xp=np, seed=0, config=None):
    """(textbook, fast, x, dlogits): the two small models with the same random state, in the same mode."""
    config = config or DeepLabConfig.small(output_stride=output_stride)
    rng = np.random.default_rng(seed)
    ours = tb.build_deeplab(config, rng=np.random.default_rng(seed), dtype=F64)
    fast = models.build_deeplab(config, rng=np.random.default_rng(seed), dtype=F64)
    state = random_state(ours, rng)
    for m in (ours, fast):
        m.load_state_dict(state)
        m.head.aspp.project.dropout.rng = np.random.default_rng(seed + 1)    # the same masks in training
        m.train(train)
        if xp is not np:
            m.to("cuda")
    x = xp.asarray(rng.standard_normal(SHAPE))
    dlogits = xp.asarray(rng.standard_normal((SHAPE[0], config.num_classes, *SHAPE[2:])))
    return ours, fast, x, dlogits


# -- structure ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [DeepLabConfig(), DeepLabConfig.small(output_stride=8),
                                    DeepLabConfig.small(output_stride=32, num_classes=2)],
                         ids=["densenet121", "small_os8", "small_os32_2classes"])
def test_same_state_dict_keys_shapes_dtypes_and_initial_weights(config):
    ours = tb.build_deeplab(config, rng=np.random.default_rng(3))
    fast = models.build_deeplab(config, rng=np.random.default_rng(3))
    a, b = ours.state_dict(), fast.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        assert np.array_equal(a[k], b[k]), f"{k}: the same Generator gives other initial values"
    assert ours.config is config and len(a) > 50


def test_builder_defaults_match_the_fast_builder():
    ours = tb.deeplabv3_densenet121(rng=np.random.default_rng(0))
    fast = models.deeplabv3_densenet121(rng=np.random.default_rng(0))
    assert ours.config == fast.config and ours.rates == fast.rates == (6, 12, 18)
    assert [k for k, _ in ours.named_parameters()] == [k for k, _ in fast.named_parameters()]
    assert ours.backbone.features.conv0.weight.dtype == np.float32
    assert tb.deeplabv3_densenet121(output_stride=8, rng=np.random.default_rng(0)).rates == (12, 24, 36)


def test_whole_textbook_model_gradcheck():
    """The tiny textbook DeepLabV3 (training mode, dropout on) against central differences: every tensor sampled."""
    model = tb.build_deeplab(DeepLabConfig.small(), rng=np.random.default_rng(16), dtype=F64)
    x = np.random.default_rng(116).standard_normal((2, 3, 33, 33))
    result = check_module(model, x, rtol=1e-6, eps=1e-6, full_limit=4, samples=3, rng=np.random.default_rng(7))
    assert {row.name for row in result.rows} == {"input"} | {n for n, _ in model.named_parameters()}


# -- the whole model against the fast one ------------------------------------------------------------------------
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_textbook_model_matches_fast_model(output_stride, train, xp):
    ours, fast, x, dlogits = pair(output_stride, train, xp)
    errors = compare_models(ours, fast, x, dlogits)
    worst = max(errors, key=errors.get)
    print(f"\nOS {output_stride} {'train' if train else 'eval'}: {len(errors)} tensors, worst {worst} "
          f"{errors[worst]:.1e}")
    assert len(errors) == 2 + len(list(ours.parameters())) + len(list(ours.named_buffers()))
    if train:   # a training forward moved the running statistics the same way in both
        assert int(ours.backbone.features.norm0.num_batches_tracked) == 1
        assert rel_err(ours.backbone.features.norm5.running_var, fast.backbone.features.norm5.running_var) <= TOL
    # one SGD step on each (the same gradients), then the next step's tensors agree as well. (Not Adam: its first
    # step moves every weight by lr * sign(gradient), which flips for a gradient of rounding size.)
    for m in (ours, fast):
        SGD(m.parameters(), lr=0.05, momentum=0.9).step()
    compare_models(ours, fast, x, dlogits)


def test_textbook_model_matches_fast_with_dropout_masks(xp):
    """Dropout p = 0.5 after the ASPP in training: the two models draw the same masks from Generators in the same
    state (the comparison above uses the configs' p = 0.1)."""
    config = DeepLabConfig.small(dropout=0.5)
    ours, fast, x, dlogits = pair(16, True, xp, config=config)
    compare_models(ours, fast, x, dlogits)


# -- a planted bug is named --------------------------------------------------------------------------------------
def test_a_broken_weight_gradient_is_named_by_layer_and_tensor(monkeypatch):
    ours, fast, x, dlogits = pair(16, True)
    conv = ours.backbone.features.denseblock2.denselayer1.conv2
    correct = conv.backward

    def broken(dout):             # a student's slip: the weight gradient 3 % too large
        dx = correct(dout)
        conv.weight.grad *= 1.03
        return dx

    monkeypatch.setattr(conv, "backward", broken)
    with pytest.raises(AssertionError) as failure:
        compare_models(ours, fast, x, dlogits)
    message = str(failure.value)
    assert message.startswith("backbone.features.denseblock2.denselayer1.conv2.weight.grad differs from the fast "
                              "model: worst rel. err 3.0e-02"), message


def test_a_dense_block_that_forgets_the_sum_is_named(monkeypatch):
    """DenseBlock.backward that overwrites instead of adding at the concatenation: the first wrong tensor in backward
    order is the first layer of the last block, whose output slice missed the later layer's part."""
    def forgets_the_sum(self, dout):
        grad, c = dout.copy(), self.out_channels
        for layer in reversed(list(self.children())):
            c -= self.growth_rate
            grad[:, :c] = layer.backward(grad[:, c:c + self.growth_rate])     # "=" where "+=" belongs
        return grad[:, :self.num_input_features]

    ours, fast, x, dlogits = pair(16, True)
    monkeypatch.setattr(tb.DenseBlock, "backward", forgets_the_sum)
    with pytest.raises(AssertionError, match=r"^backbone\.features\.denseblock4\.denselayer1\.conv2\.weight\.grad "
                                             r"differs from the fast model: worst rel\. err"):
        compare_models(ours, fast, x, dlogits)


# -- PyTorch --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_textbook_model_matches_pytorch(output_stride, train):
    torch = pytest.importorskip("torch")
    from minideeplab.torch_oracle import to_torch

    ours, _, x, dlogits = pair(output_stride, train)
    ours.head.aspp.project.dropout.p = 0.0      # two libraries cannot draw the same masks
    tmodel = to_torch(ours)
    assert list(tmodel.state_dict()) == list(ours.state_dict())
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    tlogits = tmodel(xt)
    tlogits.backward(torch.from_numpy(dlogits))
    tensors = model_tensors(ours, x, dlogits)
    reference = {"logits": tlogits.detach().numpy(), "input.grad": xt.grad.numpy()}
    reference.update({f"{k}.grad": p.grad.numpy() for k, p in tmodel.named_parameters()})
    reference.update({k: v.numpy() for k, v in tmodel.state_dict().items() if "running" in k})
    errors = {k: rel_err(tensors[k], reference[k]) for k in reference}
    worst = max(errors, key=errors.get)
    print(f"\nOS {output_stride} {'train' if train else 'eval'} vs PyTorch: {len(errors)} tensors, worst {worst} "
          f"{errors[worst]:.1e}")
    assert errors[worst] <= TOL, f"{worst} differs from PyTorch: worst rel. err {errors[worst]:.1e}"


# -- the Module protocol and checkpoints -------------------------------------------------------------------------
def test_checkpoints_move_both_ways(tmp_path, rng):
    config = DeepLabConfig.small()
    ours = tb.build_deeplab(config, rng=np.random.default_rng(1))
    fast = models.build_deeplab(config, rng=np.random.default_rng(2))
    state = random_state(ours, rng)
    ours.load_state_dict(state)
    io.save(ours, tmp_path / "textbook.npz")
    io.load(fast, tmp_path / "textbook.npz")
    for k, v in fast.state_dict().items():
        assert np.array_equal(v, state[k]), k
    fast.backbone.features.conv0.weight.data[...] += 1.0
    io.save(fast, tmp_path / "fast.npz", meta={"epoch": 3})
    assert io.load(ours, tmp_path / "fast.npz")["epoch"] == 3
    for k, v in ours.state_dict().items():
        assert np.array_equal(v, fast.state_dict()[k]), k
    rebuilt = io.load_model(tmp_path / "textbook.npz")      # a textbook checkpoint rebuilds as the fast model
    assert isinstance(rebuilt, models.DeepLabV3) and np.array_equal(rebuilt.head.classifier.bias.data,
                                                                    state["head.classifier.bias"])


def test_module_protocol_works_the_same(rng):
    config = DeepLabConfig.small()
    ours = tb.build_deeplab(config, rng=np.random.default_rng(0))
    fast = models.build_deeplab(config, rng=np.random.default_rng(0))
    assert [p.shape for p in ours.parameters()] == [p.shape for p in fast.parameters()]
    # the same module tree, but for the fast ASPP's Concat module (the textbook concatenates inline)
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in fast.named_modules() if n != "head.aspp.concat"]
    assert all(not m.training for m in ours.eval().modules())
    assert all(m.training for m in ours.train().modules())
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    ours.backward(np.ones_like(ours(x)))
    assert any(float(np.abs(p.grad).max()) > 0 for p in ours.parameters())
    ours.zero_grad()
    assert all(float(np.abs(p.grad).max()) == 0 for p in ours.parameters())
    ours.double()
    assert {p.data.dtype for p in ours.parameters()} == {p.grad.dtype for p in ours.parameters()} == {np.dtype(F64)}
    assert ours.backbone.features.norm0.running_var.dtype == F64
    assert ours.backbone.features.norm0.num_batches_tracked.dtype == np.int64
    assert ours(x.astype(F64)).dtype == F64


def test_to_device_round_trip_keeps_the_state(xp):
    if xp is np:
        pytest.skip("needs CuPy and a GPU")
    ours, fast, x, dlogits = pair(16, True, xp)
    host = to_numpy(ours.to("cpu").head.classifier.weight.data).copy()
    ours.to("cuda")
    assert np.array_equal(to_numpy(ours.head.classifier.weight.data), host)


def test_textbook_model_refuses_batch_one_in_training_as_the_fast_one():
    config = DeepLabConfig.small()
    x = np.zeros((1, 3, 32, 32), dtype=np.float32)
    errors = []
    for build in (tb.build_deeplab, models.build_deeplab):
        with pytest.raises(ValueError) as e:
            build(config, rng=np.random.default_rng(0))(x)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "head.aspp.pooling" in errors[0]
    assert tb.build_deeplab(config, rng=np.random.default_rng(0)).eval()(x).shape == (1, 1, 32, 32)


# -- it trains ---------------------------------------------------------------------------------------------------
def test_textbook_model_trains_with_the_packages_optimizer():
    """A pipeline check: a few AdamW steps on one tiny SyntheticShapes batch (float32) lower the BCE loss."""
    data = SyntheticShapes(4, size=32, seed=0)
    images, masks = (np.stack(a) for a in zip(*(data[i] for i in range(4))))
    model = tb.build_deeplab(DeepLabConfig.small(), rng=np.random.default_rng(0))
    loss_fn, opt = tb.BCEWithLogitsLoss(), AdamW(model.parameters(), lr=3e-3)
    values = []
    for _ in range(8):
        opt.zero_grad()
        values.append(float(loss_fn(model(images), masks)))
        model.backward(loss_fn.backward(), input_grad=False)
        opt.step()
    assert model.backbone.features.conv0.weight.dtype == np.float32 and np.isfinite(values).all()
    assert values[-1] < 0.9 * values[0], values


def test_bench_reports_the_textbook_model_beside_ours(tmp_path):
    """``minideeplab bench --textbook`` (quick mode): a textbook phase per row and round, its table in the Markdown;
    the structure, never the timings."""
    import json

    from minideeplab import bench

    rc = bench.main(["--quick", "--repeats", "1", "--warmup", "0", "--threads", "1", "--rounds", "2", "--no-torch",
                     "--no-profile", "--textbook", "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "bench_cpu_quick.json").read_text())
    for row in report["rows"]:
        assert len(row["textbook"]["times_s"]) == 2 and row["textbook_s"] > 0 and row["textbook_peak_rss_mib"] > 10
        (t1, t2), (o1, o2) = row["textbook"]["times_s"], row["ours"]["times_s"]
        assert row["textbook_round_ratios"] == pytest.approx([t1 / o1, t2 / o2])
    md = (tmp_path / "bench_cpu_quick.md").read_text()
    assert "The textbook model (`minideeplab.textbook`" in md and "| 16 | train |" in md
