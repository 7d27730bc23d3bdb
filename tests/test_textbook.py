"""The textbook layers (``minideeplab.textbook``): plain, short, checked by finite differences, and tied to their fast
twins in ``minideeplab.nn`` / ``minideeplab.losses`` to float64 rounding on random shapes.

Errors are ``max |textbook - fast| / max |fast|`` per tensor (outputs, dx, every parameter gradient, every buffer).
"""
import ast
import inspect
import io
import tokenize
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from minideeplab import losses, nn
from minideeplab import textbook as tb
from minideeplab.backend import to_numpy
from minideeplab.exercises.loader import ALLOWED_IMPORTS
from minideeplab.exercises.regions import is_marker
from minideeplab.gradcheck import check_module
from minideeplab.models import aspp as fast_aspp
from minideeplab.models import densenet as fast_densenet

F64 = np.float64
TOL = 1e-10          # textbook vs fast, one layer, float64
TEXTBOOK = Path(tb.__file__).resolve().parent


# -- helpers (test_textbook_model.py uses them too) --------------------------------------------------------------
def rel_err(a, b) -> float:
    """max |a - b| / max |b| (0 when both are all zero)."""
    a, b = np.asarray(to_numpy(a), F64), np.asarray(to_numpy(b), F64)
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {a.shape} vs {b.shape}")
    scale = np.abs(b).max(initial=0.0)
    diff = np.abs(a - b).max(initial=0.0)
    return float(diff / scale) if scale > 0 else float(diff)


def run(layer, inputs, dout):
    """Forward and backward once: (out, dx, {param name: grad}, {buffer name: value})."""
    layer.zero_grad()
    out = layer(*inputs)
    dx = layer.backward(dout)
    grads = {f"{n}.grad": p.grad.copy() for n, p in layer.named_parameters()}
    buffers = {n: b.copy() for n, b in layer.named_buffers()}
    return out, dx, grads, buffers


def compare_with_fast(textbook_layer, fast_layer, inputs, rng, xp, tol=TOL, dout=None):
    """Give the fast twin the textbook layer's state (and mode), run both forward and backward on ``inputs`` with the
    same random ``dout``, and assert that output, dx, every parameter gradient and every buffer (running statistics)
    agree to ``tol``. Returns the errors by tensor."""
    state = {k: v.copy() for k, v in textbook_layer.state_dict().items()}
    generators = [(m.rng, m.rng.bit_generator.state) for m in textbook_layer.modules()
                  if isinstance(getattr(m, "rng", None), np.random.Generator)]
    if dout is None:      # one forward for dout's shape, then undone: running statistics and dropout Generators
        dout = xp.asarray(rng.standard_normal(np.shape(textbook_layer(*inputs))))
        textbook_layer.load_state_dict(state)
        for generator, s in generators:
            generator.bit_generator.state = s
    if state:
        fast_layer.load_state_dict(state)
    fast_layer.train(textbook_layer.training)
    a, b = run(textbook_layer, inputs, dout), run(fast_layer, inputs, dout)
    errors = {"out": rel_err(a[0], b[0]), "dx": rel_err(a[1], b[1])}
    assert a[2].keys() == b[2].keys() and a[3].keys() == b[3].keys()
    errors.update({k: rel_err(a[2][k], b[2][k]) for k in a[2]})
    errors.update({k: rel_err(a[3][k], b[3][k]) for k in a[3]})
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, (f"textbook {type(textbook_layer).__name__}: {worst} differs from the fast "
                                  f"{type(fast_layer).__name__}: rel. err {errors[worst]:.1e} (all: {errors})")
    return errors


def on(xp, *modules):
    for m in modules:
        if xp is not np:
            m.to("cuda")
    return modules if len(modules) > 1 else modules[0]


# -- the rules: plain imports, one screen per layer ------------------------------------------------------------
ALLOWED = ALLOWED_IMPORTS     # one rule for the textbook and for a student's copy of it (minideeplab exercises)


def _imports(path):
    """(absolute module, imported names or None) for every import statement of a textbook file."""
    package = "minideeplab.textbook"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield module, {a.name for a in node.names}


@pytest.mark.parametrize("path", sorted(TEXTBOOK.glob("*.py")), ids=lambda p: p.name)
def test_textbook_imports_nothing_from_the_fast_paths(path):
    for module, names in _imports(path):
        if module.startswith("minideeplab.textbook"):
            continue
        assert module in ALLOWED, f"{path.name} imports {module}: the textbook may import only {sorted(ALLOWED)}"
        allowed = ALLOWED[module]
        assert allowed is None or names <= allowed, \
            f"{path.name} imports {sorted(names - allowed)} from {module}; allowed: {sorted(allowed)}"


def test_the_import_rule_catches_a_fast_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from ..nn.functional import im2col\nfrom ..backend import matmul\n")
    found = list(_imports(bad))
    assert ("minideeplab.nn.functional", {"im2col"}) in found and ("minideeplab.backend", {"matmul"}) in found


def code_lines(fn) -> int:
    """Physical lines of a function's source, its docstring and the exercise markers (``### BEGIN SOLUTION``,
    ``### HINT: ...``, ``### END SOLUTION``: not code) excluded; comments and blank lines count."""
    source = inspect.getsource(fn)
    lines = [line for line in source.splitlines() if not is_marker(line)]
    body = ast.parse(inspect.cleandoc("\n" + source) if source[0] == " " else source).body[0]
    doc = body.body[0] if body.body and isinstance(body.body[0], ast.Expr) and \
        isinstance(getattr(body.body[0], "value", None), ast.Constant) and isinstance(body.body[0].value.value, str) \
        else None
    skipped = (doc.end_lineno - doc.lineno + 1) if doc is not None else 0
    return len(lines) - skipped


# forward + backward of every textbook layer, loss and model part that defines them itself
SCREEN = 40
LAYERS = [tb.Conv2d, tb.BatchNorm2d, tb.ReLU, tb.Sigmoid, tb.Dropout, tb.MaxPool2d, tb.AvgPool2d,
          tb.AdaptiveAvgPool2d, tb.Upsample, tb.BCEWithLogitsLoss, tb.DiceLoss, tb.Sequential, tb.DenseBlock,
          tb.ASPPPooling, tb.ASPP, tb.DenseNet, tb.DeepLabV3]


def line_counts() -> dict:
    counts = {}
    for cls in LAYERS:
        counts[cls.__name__] = sum(code_lines(cls.__dict__[f]) for f in ("forward", "backward") if f in cls.__dict__)
    for fn in (tb.im2col, tb.col2im, tb.interpolation_matrix):
        counts[fn.__name__] = code_lines(fn)
    return counts


def test_every_layer_fits_on_one_screen():
    counts = line_counts()
    print("\nforward + backward lines (docstrings excluded):", counts)
    too_long = {k: v for k, v in counts.items() if v > SCREEN}
    assert not too_long, f"longer than one screen ({SCREEN} lines): {too_long}"
    assert counts["Conv2d"] > 10 and counts["im2col"] > 5     # the measure measures something


def test_code_lines_skips_the_docstring_and_the_exercise_markers_only():
    def f(x):
        """One.

        Two.
        """
        # a comment
        return x
    assert code_lines(f) == 3

    def g(x):
        """One."""
        ### BEGIN SOLUTION
        ### HINT: a hint
        # a comment
        return x
        ### END SOLUTION
    assert code_lines(g) == 3


def test_every_backward_states_its_derivative():
    for cls in LAYERS:
        if "backward" in cls.__dict__:
            source = io.StringIO(inspect.getsource(cls.backward)).readline
            comments = [t for t in tokenize.generate_tokens(source) if t.type == tokenize.COMMENT]
            assert comments, f"{cls.__name__}.backward has no comment line stating its derivative"


# -- finite differences ---------------------------------------------------------------------------------------
def _random_bn(m, rng):
    m.weight.data[...] = rng.uniform(0.5, 1.5, m.weight.shape)
    m.bias.data[...] = rng.normal(0, 0.5, m.bias.shape)
    m.running_mean[...] = rng.normal(0, 0.5, m.running_mean.shape)
    m.running_var[...] = rng.uniform(0.5, 2.0, m.running_var.shape)
    return m


GRADCHECK = {
    "conv_k3_s1_p1": (lambda r: tb.Conv2d(3, 4, 3, padding=1, rng=r, dtype=F64), (2, 3, 6, 5)),
    "conv_k3_s2_p2_d2": (lambda r: tb.Conv2d(2, 3, 3, 2, 2, 2, rng=r, dtype=F64), (2, 2, 9, 8)),
    "conv_k7_s2_p3": (lambda r: tb.Conv2d(3, 2, 7, 2, 3, rng=r, dtype=F64), (1, 3, 11, 10)),
    "conv_1x1_nobias": (lambda r: tb.Conv2d(4, 3, 1, bias=False, rng=r, dtype=F64), (2, 4, 3, 3)),
    "conv_rect": (lambda r: tb.Conv2d(2, 2, (3, 5), (1, 2), (0, 2), (2, 1), rng=r, dtype=F64), (1, 2, 9, 8)),
    "bn_train": (lambda r: _random_bn(tb.BatchNorm2d(3, dtype=F64), r), (3, 3, 4, 5)),
    "bn_eval": (lambda r: _random_bn(tb.BatchNorm2d(3, dtype=F64), r).eval(), (2, 3, 4, 5)),
    "bn_no_affine": (lambda r: tb.BatchNorm2d(2, affine=False, dtype=F64), (2, 2, 3, 3)),
    "relu": (lambda r: tb.ReLU(), (2, 3, 4, 4)),
    "sigmoid": (lambda r: tb.Sigmoid(), (2, 3, 4, 4)),
    "dropout": (lambda r: tb.Dropout(0.3, rng=np.random.default_rng(5)), (2, 3, 4, 4)),
    "maxpool_k3_s2_p1": (lambda r: tb.MaxPool2d(3, 2, 1), (2, 2, 7, 6)),
    "maxpool_k2": (lambda r: tb.MaxPool2d(2), (1, 2, 6, 5)),
    "avgpool_k2": (lambda r: tb.AvgPool2d(2, 2), (2, 2, 7, 6)),
    "avgpool_k3_s2_p1": (lambda r: tb.AvgPool2d(3, 2, 1), (2, 2, 7, 6)),
    "gap": (lambda r: tb.AdaptiveAvgPool2d(1), (2, 3, 5, 4)),
    "upsample_size": (lambda r: tb.Upsample(size=(7, 5)), (2, 2, 3, 4)),
    "upsample_down": (lambda r: tb.Upsample(size=(3, 2)), (1, 2, 7, 5)),
    "upsample_scale": (lambda r: tb.Upsample(scale_factor=1.5), (1, 2, 4, 3)),
    "upsample_corners": (lambda r: tb.Upsample(size=(6, 7), align_corners=True), (1, 2, 3, 4)),
    "dense_block": (lambda r: tb.DenseBlock(3, 4, 2, 3, rng=r, dtype=F64), (2, 4, 5, 5)),
    "dense_block_atrous": (lambda r: tb.DenseBlock(2, 3, 2, 2, dilation=2, rng=r, dtype=F64), (2, 3, 5, 6)),
    "transition": (lambda r: tb.Transition(4, 2, rng=r, dtype=F64), (2, 4, 5, 6)),
    "aspp": (lambda r: tb.ASPP(6, 3, rates=(1, 2, 3), dropout=0.2, rng=r, dtype=F64), (2, 6, 5, 4)),
    "aspp_eval_batch1": (lambda r: tb.ASPP(4, 2, rates=(1, 2, 3), rng=r, dtype=F64).eval(), (1, 4, 4, 4)),
}


@pytest.mark.parametrize("name", GRADCHECK)
def test_textbook_layer_gradcheck(name, xp, rng):
    make, shape = GRADCHECK[name]
    layer = on(xp, make(rng))
    x = xp.asarray(rng.standard_normal(shape))
    check_module(layer, x, rng=rng)


def test_textbook_relu_and_maxpool_inputs_away_from_kinks(xp, rng):
    """ReLU and max pooling at inputs with gaps: every entry's finite difference stays on one side of its kink."""
    x = rng.permutation(np.linspace(-3, 3, 2 * 2 * 7 * 6)).reshape(2, 2, 7, 6)
    for layer in (tb.ReLU(), tb.MaxPool2d(3, 2, 1)):
        check_module(layer, xp.asarray(x), rng=rng)


@pytest.mark.parametrize("loss", ["bce", "bce_sum", "bce_none", "bce_pos_weight", "dice", "dice_per_image"])
def test_textbook_loss_gradcheck(loss, xp, rng):
    make = {"bce": lambda: tb.BCEWithLogitsLoss(), "bce_sum": lambda: tb.BCEWithLogitsLoss(reduction="sum"),
            "bce_none": lambda: tb.BCEWithLogitsLoss(reduction="none"),
            "bce_pos_weight": lambda: tb.BCEWithLogitsLoss(pos_weight=2.5),
            "dice": lambda: tb.DiceLoss(), "dice_per_image": lambda: tb.DiceLoss(smooth=0.5, per_image=True)}[loss]
    logits = xp.asarray(rng.standard_normal((2, 1, 4, 5)) * 3)
    target = xp.asarray((rng.random((2, 1, 4, 5)) < 0.4).astype(F64))
    check_module(make(), (logits, target), wrt_inputs=(0,), rng=rng)


def test_im2col_and_col2im_are_adjoint(xp, rng):
    x = xp.asarray(rng.standard_normal((2, 3, 8, 7)))
    args = dict(kernel_size=(3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 3))
    cols = tb.im2col(x, **args)
    c = xp.asarray(rng.standard_normal(cols.shape))
    lhs, rhs = float(xp.sum(cols * c)), float(xp.sum(x * tb.col2im(c, x.shape, **args)))
    assert abs(lhs - rhs) <= 1e-12 * abs(lhs)


def test_col2im_adds_overlapping_windows(xp):
    """3x3 windows at stride 1 on a 3x3 map padded by 1: the centre pixel is read by all 9 windows."""
    x = xp.ones((1, 1, 3, 3))
    dx = tb.col2im(tb.im2col(x, 3, 1, 1), x.shape, 3, 1, 1)
    assert to_numpy(dx)[0, 0].tolist() == [[4, 6, 4], [6, 9, 6], [4, 6, 4]]


# -- against the fast twins ------------------------------------------------------------------------------------
def conv_paths(k, s, p):
    """The fast Conv2d's paths that apply to this geometry (forced one by one), and its own choice."""
    k, s, p = (v if isinstance(v, tuple) else (v, v) for v in (k, s, p))
    paths = ["auto", "im2col", "gather"] + (["kn2row", "taps"] if s == (1, 1) else [])
    return paths + (["pointwise"] if k == (1, 1) and p == (0, 0) else [])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 4), f=st.integers(1, 4), kh=st.integers(1, 4), kw=st.integers(1, 4),
       s=st.integers(1, 3), p=st.integers(0, 3), d=st.integers(1, 3), h=st.integers(1, 11), w=st.integers(1, 11),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_conv_matches_every_fast_path_on_random_geometry(n, c, f, kh, kw, s, p, d, h, w, bias, seed):
    assume(tb.conv_output_size(h, kh, s, p, d) >= 1 and tb.conv_output_size(w, kw, s, p, d) >= 1)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w))
    for algo in conv_paths((kh, kw), s, p):
        ours = tb.Conv2d(c, f, (kh, kw), s, p, d, bias=bias, rng=np.random.default_rng(seed), dtype=F64)
        fast = nn.Conv2d(c, f, (kh, kw), s, p, d, bias=bias, rng=np.random.default_rng(seed), dtype=F64,
                         algorithm=algo)
        assert np.array_equal(ours.weight.data, fast.weight.data)      # the same init from the same Generator
        compare_with_fast(ours, fast, (x,), rng, np)


@pytest.mark.parametrize("case", [(3, 1, 1, 1, (9, 8)), (3, 1, 2, 2, (6, 7)), (3, 1, 6, 6, (5, 6)),
                                  (3, 1, 7, 7, (5, 5)), (7, 2, 3, 1, (11, 10)), (1, 1, 0, 1, (4, 6)),
                                  (1, 2, 0, 1, (5, 5))],
                         ids=lambda c: f"k{c[0]}_s{c[1]}_p{c[2]}_d{c[3]}")
def test_conv_matches_the_fast_paths_on_model_geometries(case, xp, rng):
    k, s, p, d, (H, W) = case
    x = xp.asarray(rng.standard_normal((2, 5, H, W)))
    for algo in conv_paths(k, s, p):
        ours, fast = on(xp, tb.Conv2d(5, 3, k, s, p, d, rng=rng, dtype=F64),
                        nn.Conv2d(5, 3, k, s, p, d, rng=rng, dtype=F64, algorithm=algo))
        compare_with_fast(ours, fast, (x,), rng, xp)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 4), h=st.integers(1, 6), w=st.integers(1, 6), train=st.booleans(),
       momentum=st.sampled_from([0.1, 0.3]), seed=st.integers(0, 2**16))
def test_batchnorm_matches_fast_with_running_statistics(n, c, h, w, train, momentum, seed):
    assume(not train or n * h * w >= 4)        # (2 and 3 values per channel: the next test)
    rng = np.random.default_rng(seed)
    ours = _random_bn(tb.BatchNorm2d(c, momentum=momentum, dtype=F64), rng).train(train)
    errors = compare_with_fast(ours, nn.BatchNorm2d(c, momentum=momentum, dtype=F64),
                               (rng.standard_normal((n, c, h, w)) * 2 + 1,), rng, np)
    assert {"running_mean", "running_var", "num_batches_tracked"} <= errors.keys()
    assert int(ours.num_batches_tracked) == (1 if train else 0)


@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (1, 2, 1, 2), (3, 2, 1, 1), (1, 1, 3, 1)])
def test_batchnorm_matches_fast_with_two_or_three_values_per_channel(shape, xp, rng):
    ours = on(xp, _random_bn(tb.BatchNorm2d(shape[1], dtype=F64), rng))
    compare_with_fast(ours, on(xp, nn.BatchNorm2d(shape[1], dtype=F64)), (xp.asarray(rng.standard_normal(shape)),),
                      rng, xp)


def test_batchnorm_running_statistics_follow_pytorch(xp, rng):
    """momentum 0.1, the unbiased variance, one more batch tracked: written out here, not asked of either layer."""
    bn = on(xp, tb.BatchNorm2d(2, dtype=F64))
    x = rng.standard_normal((3, 2, 4, 5)) * 3 + 2
    bn(xp.asarray(x))
    bn(xp.asarray(x))
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(to_numpy(bn.running_mean), 0.19 * mean, rtol=1e-12)
    np.testing.assert_allclose(to_numpy(bn.running_var), 0.81 + 0.19 * var, rtol=1e-12)
    assert int(bn.num_batches_tracked) == 2


@pytest.mark.parametrize("train", [True, False])
def test_elementwise_layers_match_fast(train, xp, rng):
    x = xp.asarray(rng.standard_normal((2, 3, 5, 4)))
    for ours, fast in [(tb.ReLU(), nn.ReLU()), (tb.Sigmoid(), nn.Sigmoid())]:
        compare_with_fast(ours.train(train), fast, (x,), rng, xp, tol=0)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_dropout_draws_the_fast_layers_masks(p, xp, rng):
    """Generators in the same state: the same masks, training mode, several draws in a row."""
    ours, fast = tb.Dropout(p, rng=np.random.default_rng(7)), nn.Dropout(p, rng=np.random.default_rng(7))
    x = xp.asarray(rng.standard_normal((2, 3, 5, 4)))
    for _ in range(3):
        compare_with_fast(ours, fast, (x,), rng, xp, tol=0)
    a, b = to_numpy(ours(x)), to_numpy(fast(x))
    assert np.array_equal(a, b) and (p == 0 or (a == 0).any())
    ours.eval()
    assert ours(x) is x


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 3), k=st.integers(1, 4), s=st.integers(1, 3), p=st.integers(0, 2), h=st.integers(1, 10),
       w=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_pools_match_fast_on_random_geometry(n, k, s, p, h, w, seed):
    assume(2 * p <= k and tb.conv_output_size(h, k, s, p) >= 1 and tb.conv_output_size(w, k, s, p) >= 1)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 2, h, w))
    compare_with_fast(tb.MaxPool2d(k, s, p), nn.MaxPool2d(k, s, p), (x,), rng, np)
    compare_with_fast(tb.AvgPool2d(k, s, p), nn.AvgPool2d(k, s, p), (x,), rng, np)


def test_maxpool_ties_go_to_the_first_tap_as_in_the_fast_layer(xp, rng):
    x = xp.asarray(rng.integers(0, 3, (2, 2, 7, 6)).astype(F64))    # many ties
    compare_with_fast(tb.MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 2, 1), (x,), rng, xp)


def test_global_pool_matches_fast(xp, rng):
    compare_with_fast(tb.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d(1), (xp.asarray(rng.standard_normal((3, 2, 5, 4))),),
                      rng, xp)


@pytest.mark.parametrize("kw", [dict(size=(7, 5)), dict(size=(2, 3)), dict(size=9), dict(scale_factor=2),
                                dict(scale_factor=1.7), dict(scale_factor=(0.5, 2.5)),
                                dict(size=(6, 7), align_corners=True), dict(size=(1, 1))],
                         ids=lambda kw: "_".join(f"{k}{v}" for k, v in kw.items()))
def test_upsample_matches_fast(kw, xp, rng):
    x = xp.asarray(rng.standard_normal((2, 3, 4, 5)))
    compare_with_fast(tb.Upsample(**kw), nn.Upsample(**kw), (x,), rng, xp)


def test_upsample_weights_are_pytorchs():
    """align_corners=False, 2 -> 4: source coordinates -0.25 (clamped to 0), 0.25, 0.75, 1.25 (PyTorch's values)."""
    A = tb.interpolation_matrix(2, 4)
    np.testing.assert_allclose(A, [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])


LOSSES = {
    "bce": (lambda: tb.BCEWithLogitsLoss(), lambda: losses.BCEWithLogitsLoss()),
    "bce_sum": (lambda: tb.BCEWithLogitsLoss(reduction="sum"), lambda: losses.BCEWithLogitsLoss(reduction="sum")),
    "bce_none": (lambda: tb.BCEWithLogitsLoss(reduction="none"), lambda: losses.BCEWithLogitsLoss(reduction="none")),
    "bce_pos_weight": (lambda: tb.BCEWithLogitsLoss(pos_weight=3.0), lambda: losses.BCEWithLogitsLoss(pos_weight=3.0)),
    "dice": (lambda: tb.DiceLoss(), lambda: losses.DiceLoss()),
    "dice_per_image": (lambda: tb.DiceLoss(0.5, per_image=True), lambda: losses.DiceLoss(0.5, per_image=True)),
}


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_losses_match_fast(name, scale, xp, rng):
    """Same values and gradients, also for saturated logits (scale 30), where a naive sigmoid-BCE overflows."""
    ours, fast = (make() for make in LOSSES[name])
    logits = xp.asarray(rng.standard_normal((2, 1, 5, 4)) * scale)
    target = xp.asarray((rng.random((2, 1, 5, 4)) < 0.4).astype(F64))
    dout = xp.asarray(rng.standard_normal(logits.shape)) if name == "bce_none" else 0.7
    a, b = ours(logits, target), fast(logits, target)
    assert a.shape == b.shape and rel_err(a, b) <= TOL
    assert rel_err(ours.backward(dout), fast.backward(dout)) <= (TOL if scale == 1 else 1e-8)
    assert rel_err(ours.backward(), fast.backward()) <= (TOL if scale == 1 else 1e-8)


def test_loss_target_of_the_wrong_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="BCEWithLogitsLoss: target must have the logits' shape"):
        tb.BCEWithLogitsLoss()(np.zeros((2, 1, 4, 4)), np.zeros((2, 4, 4)))


# -- the model parts --------------------------------------------------------------------------------------------
def _randomize_norms(module, rng):
    for m in module.modules():
        if isinstance(m, tb.BatchNorm2d):
            _random_bn(m, rng)
    return module


PARTS = {
    "dense_layer": (lambda r: tb.DenseLayer(5, 3, 2, rng=r, dtype=F64),
                    lambda r: fast_densenet.DenseLayer(5, 3, 2, rng=r, dtype=F64), (2, 5, 6, 5)),
    "dense_block": (lambda r: tb.DenseBlock(3, 4, 2, 3, dilation=2, rng=r, dtype=F64),
                    lambda r: fast_densenet.DenseBlock(3, 4, 2, 3, dilation=2, rng=r, dtype=F64), (2, 4, 7, 6)),
    "dense_block_batch1": (lambda r: tb.DenseBlock(2, 4, 2, 3, rng=r, dtype=F64),
                           lambda r: fast_densenet.DenseBlock(2, 4, 2, 3, rng=r, dtype=F64), (1, 4, 5, 3)),
    "transition": (lambda r: tb.Transition(6, 3, rng=r, dtype=F64),
                   lambda r: fast_densenet.Transition(6, 3, rng=r, dtype=F64), (2, 6, 7, 5)),
    "transition_no_pool": (lambda r: tb.Transition(6, 3, pool=False, rng=r, dtype=F64),
                           lambda r: fast_densenet.Transition(6, 3, pool=False, rng=r, dtype=F64), (2, 6, 4, 5)),
    "aspp": (lambda r: tb.ASPP(6, 3, rates=(1, 3, 6), dropout=0.0, rng=r, dtype=F64),
             lambda r: fast_aspp.ASPP(6, 3, rates=(1, 3, 6), dropout=0.0, rng=r, dtype=F64), (2, 6, 5, 4)),
    "aspp_pooling": (lambda r: tb.ASPPPooling(4, 3, rng=r, dtype=F64),
                     lambda r: fast_aspp.ASPPPooling(4, 3, rng=r, dtype=F64), (3, 4, 5, 6)),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", PARTS)
def test_model_parts_match_fast(name, train, xp, rng):
    make_ours, make_fast, shape = PARTS[name]
    ours = on(xp, _randomize_norms(make_ours(rng), rng).train(train))
    fast = on(xp, make_fast(rng))
    compare_with_fast(ours, fast, (xp.asarray(rng.standard_normal(shape)),), rng, xp, tol=1e-9)


def test_aspp_refuses_batch_one_in_training_with_the_fast_models_error(rng):
    x = rng.standard_normal((1, 4, 3, 3))
    with pytest.raises(ValueError) as ours:
        tb.ASPP(4, 2, rng=rng, dtype=F64)(x)
    with pytest.raises(ValueError) as fast:
        fast_aspp.ASPP(4, 2, rng=rng, dtype=F64)(x)
    assert str(ours.value) == str(fast.value) and "head.aspp.pooling" in str(ours.value)
