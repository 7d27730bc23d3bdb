"""Losses: gradient checks (float64), hand-computed values, extreme logits, PyTorch parity, clear errors."""
import math

import numpy as np
import pytest

from minideeplab.backend import to_numpy
from minideeplab.gradcheck import check_module
from minideeplab.losses import (
    BCEWithLogitsLoss,
    CombinedLoss,
    DiceLoss,
    FocalLoss,
    HingeLoss,
    SquaredHingeLoss,
    build_loss,
)

LN2 = math.log(2.0)


def _case(xp, rng, shape=(2, 1, 4, 5), scale=3.0):
    """float64 logits away from the hinge kinks (|x| = 1) and a random binary target."""
    x = rng.standard_normal(shape) * scale
    x[np.abs(np.abs(x) - 1) < 0.02] += 0.05
    t = (rng.random(shape) < 0.4).astype(np.float64)
    return xp.asarray(x), xp.asarray(t)


LOSS_FACTORIES = {
    "bce": lambda: BCEWithLogitsLoss(),
    "bce_sum": lambda: BCEWithLogitsLoss(reduction="sum"),
    "bce_none": lambda: BCEWithLogitsLoss(reduction="none"),
    "bce_pos_weight": lambda: BCEWithLogitsLoss(pos_weight=3.0),
    "dice": lambda: DiceLoss(),
    "dice_per_image": lambda: DiceLoss(smooth=0.5, per_image=True),
    "focal": lambda: FocalLoss(),
    "focal_gamma_half_no_alpha": lambda: FocalLoss(alpha=None, gamma=0.5),
    "focal_sum": lambda: FocalLoss(alpha=0.6, gamma=3.0, reduction="sum"),
    "hinge": lambda: HingeLoss(),
    "squared_hinge": lambda: SquaredHingeLoss(),
    "bce+dice": lambda: build_loss("bce+dice"),
    "weighted": lambda: CombinedLoss([(0.3, FocalLoss()), (0.7, DiceLoss()), (2.0, SquaredHingeLoss())]),
}


@pytest.mark.parametrize("name", sorted(LOSS_FACTORIES))
def test_gradient_check_moderate_logits(xp, rng, name):
    x, t = _case(xp, rng)
    result = check_module(LOSS_FACTORIES[name](), (x, t), wrt_inputs=(0,), rng=rng, full_limit=64)
    assert result.rows[0].checked == 40 and result.worst < 1e-6


def test_gradient_check_pos_weight_per_channel(xp, rng):
    x, t = _case(xp, rng, shape=(2, 3, 3, 3))
    loss = BCEWithLogitsLoss(pos_weight=np.array([0.5, 2.0, 7.0]).reshape(3, 1, 1))
    check_module(loss, (x, t), wrt_inputs=(0,), rng=rng, full_limit=64)


@pytest.mark.parametrize("name", sorted(LOSS_FACTORIES))
def test_gradient_check_saturated_wrong_side(xp, rng, name):
    """Logits of +-30 on the wrong side of their target (gradient of full size) mixed with moderate ones."""
    x, t = _case(xp, rng, shape=(2, 1, 3, 4), scale=1.5)
    wrong = 30.0 * (1 - 2 * t)                      # +30 where t = 0, -30 where t = 1
    x = xp.where(xp.asarray(rng.random(x.shape) < 0.5), wrong, x)
    check_module(LOSS_FACTORIES[name](), (x, t), wrt_inputs=(0,), rng=rng)


@pytest.mark.parametrize("name", ["bce", "bce_pos_weight", "focal", "focal_gamma_half_no_alpha", "dice"])
def test_gradient_check_saturated_right_side(xp, rng, name):
    """All logits 20..30 on the right side: losses and gradients are ~e^-20..e^-90 and must be *relatively*
    accurate (computing sigmoid(x) - 1 by subtraction would lose every digit here)."""
    t = (rng.random((2, 1, 3, 3)) < 0.5).astype(np.float64)
    x = (2 * t - 1) * rng.uniform(20, 30, size=t.shape)
    result = check_module(LOSS_FACTORIES[name](), (xp.asarray(x), xp.asarray(t)), wrt_inputs=(0,), rng=rng,
                          raise_on_fail=False)
    assert result.rows[0].max_rel_err < 1e-6, str(result)
    if name == "bce":   # and against the closed form dl/dx = -t e^-|x| / (1 + e^-|x|) + (1-t) ..., per element
        e = np.exp(-np.abs(x))
        expected = np.where(t == 1, -e / (1 + e), e / (1 + e)) / x.size
        loss = BCEWithLogitsLoss()
        loss(xp.asarray(x), xp.asarray(t))
        np.testing.assert_allclose(to_numpy(loss.backward()), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["bce", "bce_pos_weight", "focal", "hinge", "squared_hinge"])
def test_gradient_check_at_1e4(xp, rng, name):
    """At |x| = 1e4 these losses are exactly linear (or quadratic) in x, so a large step has no truncation error."""
    t = (rng.random((2, 1, 2, 3)) < 0.5).astype(np.float64)
    x = rng.choice([-1e4, 1e4], size=t.shape)
    x[0, 0, 0, :2] = [1e4, -1e4]
    t[0, 0, 0, :2] = [0, 1]                          # at least one wrong-side entry of each sign
    check_module(LOSS_FACTORIES[name](), (xp.asarray(x), xp.asarray(t)), wrt_inputs=(0,), rng=rng, eps=1e-3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(LOSS_FACTORIES))
def test_extreme_logits_finite(xp, name, dtype):
    x = xp.asarray(np.array([1e4, -1e4, 1e4, -1e4, 0.0, 30.0], dtype=dtype))
    t = xp.asarray(np.array([0, 1, 1, 0, 1, 0], dtype=dtype))
    loss = LOSS_FACTORIES[name]()
    value, grad = to_numpy(loss(x, t)), to_numpy(loss.backward())
    assert np.all(np.isfinite(value)) and np.all(np.isfinite(grad))
    assert value.dtype == dtype and grad.dtype == dtype and grad.shape == (6,)


def test_bce_extreme_values_by_hand(xp):
    x = xp.asarray([1e4, -1e4, 1e4, -1e4])
    t = xp.asarray([0.0, 1.0, 1.0, 0.0])
    loss = BCEWithLogitsLoss(reduction="none")
    np.testing.assert_array_equal(to_numpy(loss(x, t)), [1e4, 1e4, 0.0, 0.0])
    np.testing.assert_array_equal(to_numpy(loss.backward(xp.ones(4))), [1.0, -1.0, 0.0, 0.0])
    weighted = BCEWithLogitsLoss(pos_weight=2.5)
    assert float(weighted(x, t)) == pytest.approx((1e4 + 2.5e4) / 4, rel=1e-15)
    np.testing.assert_array_equal(to_numpy(weighted.backward()), [0.25, -2.5 / 4, 0.0, 0.0])


def test_bce_pos_weight_is_converted_once_per_dtype(xp):
    """pos_weight becomes an array of the logits' library and dtype once, not at every call (on a GPU: a copy from
    the host per step, which a captured CUDA graph must not contain); a new pos_weight replaces it."""
    x, t = xp.zeros(2, dtype=np.float32), xp.asarray([1.0, 0.0], dtype=np.float32)
    loss = BCEWithLogitsLoss(pos_weight=np.array([3.0]), reduction="none")
    first = loss.pos_weight_as(x)
    assert type(first) is type(x) and first.dtype == np.float32
    np.testing.assert_allclose(to_numpy(loss(x, t)), [3 * LN2, LN2], rtol=1e-6)
    assert loss.pos_weight_as(x) is first                       # the forward above used the same array
    assert loss.pos_weight_as(xp.zeros(2)).dtype == np.float64    # float64 logits: a float64 one
    loss.pos_weight = 0.5
    np.testing.assert_allclose(to_numpy(loss(x, t)), [0.5 * LN2, LN2], rtol=1e-6)
    with pytest.raises(ValueError, match="pos_weight must be >= 0"):
        loss.pos_weight = -2.0


def test_bce_values_and_reductions_by_hand(xp):
    # sigmoid(ln 3) = 3/4: the loss is -ln(3/4) for t = 1 and -ln(1/4) = ln 4 for t = 0; sigmoid(0) = 1/2
    x = xp.asarray([math.log(3.0), math.log(3.0), 0.0])
    t = xp.asarray([1.0, 0.0, 1.0])
    per = [-math.log(0.75), math.log(4.0), LN2]
    assert float(BCEWithLogitsLoss()(x, t)) == pytest.approx(sum(per) / 3, rel=1e-14)
    loss = BCEWithLogitsLoss(reduction="sum")
    assert float(loss(x, t)) == pytest.approx(sum(per), rel=1e-14)
    np.testing.assert_allclose(to_numpy(loss.backward()), [0.75 - 1, 0.75, 0.5 - 1], rtol=1e-14)
    none = BCEWithLogitsLoss(reduction="none")
    np.testing.assert_allclose(to_numpy(none(x, t)), per, rtol=1e-14)
    # pos_weight multiplies only the positive term: 3 ln 2 for (x=0, t=1), ln 2 for (x=0, t=0)
    pw = BCEWithLogitsLoss(pos_weight=3.0, reduction="none")
    np.testing.assert_allclose(to_numpy(pw(xp.zeros(2), xp.asarray([1.0, 0.0]))), [3 * LN2, LN2], rtol=1e-14)
    np.testing.assert_allclose(to_numpy(pw.backward(xp.ones(2))), [-1.5, 0.5], rtol=1e-14)


def test_dice_by_hand(xp):
    x = xp.zeros((2, 1, 1, 2))                                    # every probability 1/2
    t = xp.asarray(np.array([1.0, 0.0, 0.0, 0.0]).reshape(2, 1, 1, 2))
    # batch-global: I = 1/2, sum p + sum t = 2 + 1 -> 1 - (1 + 1) / (3 + 1) = 1/2
    assert float(DiceLoss(smooth=1.0)(x, t)) == pytest.approx(0.5, rel=1e-15)
    # per image: image 1 -> 1 - 2/3 = 1/3, image 2 (empty mask) -> 1 - 1/2 = 1/2; mean 5/12
    assert float(DiceLoss(smooth=1.0, per_image=True)(x, t)) == pytest.approx(5 / 12, rel=1e-15)
    # empty mask predicted empty (p = 0 exactly at -1e4): a perfect score
    assert float(DiceLoss()(xp.full((1, 1, 2, 2), -1e4), xp.zeros((1, 1, 2, 2)))) == 0.0


def test_focal_by_hand_and_reduces_to_bce(xp, rng):
    # x = 0: q = 1/2, ce = ln 2; alpha_t = 0.25 (t=1), 0.75 (t=0): (0.25 + 0.75) * 0.25 * ln 2 / 2 = ln 2 / 8
    assert float(FocalLoss()(xp.zeros(2), xp.asarray([1.0, 0.0]))) == pytest.approx(LN2 / 8, rel=1e-14)
    x, t = _case(xp, rng)
    plain, bce = FocalLoss(alpha=None, gamma=0.0), BCEWithLogitsLoss()
    np.testing.assert_allclose(to_numpy(plain(x, t)), to_numpy(bce(x, t)), rtol=1e-14)
    np.testing.assert_allclose(to_numpy(plain.backward()), to_numpy(bce.backward()), rtol=1e-13)


def test_hinge_by_hand_and_kink_convention(xp):
    x = xp.asarray([0.5, -2.0, 2.0, 3.0])
    t = xp.asarray([1.0, 1.0, 0.0, 1.0])     # y = +1, +1, -1, +1 -> margins 1 - yx = 0.5, 3, 3, -2
    h, sq = HingeLoss(reduction="none"), SquaredHingeLoss(reduction="none")
    np.testing.assert_allclose(to_numpy(h(x, t)), [0.5, 3.0, 3.0, 0.0], rtol=1e-15)
    np.testing.assert_allclose(to_numpy(h.backward(xp.ones(4))), [-1.0, -1.0, 1.0, 0.0])
    np.testing.assert_allclose(to_numpy(sq(x, t)), [0.25, 9.0, 9.0, 0.0], rtol=1e-15)
    np.testing.assert_allclose(to_numpy(sq.backward(xp.ones(4))), [-1.0, -6.0, 6.0, 0.0], rtol=1e-15)
    assert float(HingeLoss()(x, t)) == pytest.approx(6.5 / 4, rel=1e-15)
    # at the kink y*x = 1 the subgradient is 0 (the margin is met)
    kink = HingeLoss(reduction="none")
    kink(xp.asarray([1.0, -1.0]), xp.asarray([1.0, 0.0]))
    np.testing.assert_array_equal(to_numpy(kink.backward(xp.ones(2))), [0.0, 0.0])


def test_combined_is_weighted_sum(xp, rng):
    x, t = _case(xp, rng)
    bce, dice = BCEWithLogitsLoss(), DiceLoss()
    combined = CombinedLoss([(0.3, BCEWithLogitsLoss()), (2.0, DiceLoss())])
    value = float(combined(x, t))
    assert value == pytest.approx(0.3 * float(bce(x, t)) + 2.0 * float(dice(x, t)), rel=1e-14)
    np.testing.assert_allclose(to_numpy(combined.backward()),
                               to_numpy(0.3 * bce.backward() + 2.0 * dice.backward()), rtol=1e-13)
    assert [float(v) for v in combined.last_values] == pytest.approx([float(bce(x, t)), float(dice(x, t))])


@pytest.mark.parametrize("name", sorted(LOSS_FACTORIES))
def test_backward_is_linear_in_dout_and_does_not_mutate_it(xp, rng, name):
    x, t = _case(xp, rng)
    loss = LOSS_FACTORIES[name]()
    out = loss(x, t)
    dout = xp.asarray(rng.standard_normal(out.shape))
    keep = dout.copy()
    g = to_numpy(loss.backward(dout))
    np.testing.assert_array_equal(to_numpy(dout), to_numpy(keep))
    np.testing.assert_allclose(to_numpy(loss.backward(2 * dout)), 2 * g, rtol=1e-14)


def test_targets_of_any_binary_dtype(xp, rng):
    x, t = _case(xp, rng)
    ref = float(BCEWithLogitsLoss()(x, t))
    for target in (t.astype(bool), t.astype(np.int64), t.astype(np.float32)):
        assert float(BCEWithLogitsLoss()(x, target)) == ref


@pytest.mark.parametrize("name", ["bce", "dice", "focal", "hinge", "squared_hinge", "bce+dice"])
def test_bad_inputs_raise_clear_errors(xp, name):
    loss = build_loss(name)
    label = "BCEWithLogitsLoss" if name == "bce+dice" else type(loss).__name__
    x = xp.zeros((2, 1, 4, 4))
    with pytest.raises(ValueError, match=rf"{label}: target must have the logits' shape \(2, 1, 4, 4\), "
                                         r"got \(2, 4, 4\)"):
        loss(x, xp.zeros((2, 4, 4)))
    soft = xp.zeros((2, 1, 4, 4))
    soft[0, 0, 0, 0] = 0.5
    with pytest.raises(ValueError, match=rf"{label}: target must be a binary mask with values in \{{0, 1\}}, "
                                         r"got 1 other value\(s\), e\.g\. 0\.5"):
        loss(x, soft)
    with pytest.raises(ValueError, match=rf"{label}: target must be a binary mask"):
        loss(x, xp.full((2, 1, 4, 4), np.nan))
    with pytest.raises(ValueError, match=rf"{label}: .*e\.g\. 255"):
        loss(x, xp.full((2, 1, 4, 4), 255, dtype=np.uint8))
    with pytest.raises(TypeError, match=rf"{label}: expected floating-point logits .*got int64"):
        loss(xp.zeros((2, 1, 4, 4), dtype=np.int64), xp.zeros((2, 1, 4, 4)))


def test_misuse_errors():
    with pytest.raises(RuntimeError, match="BCEWithLogitsLoss.backward called before forward"):
        BCEWithLogitsLoss().backward()
    with pytest.raises(RuntimeError, match="DiceLoss.backward called before forward"):
        DiceLoss().backward()
    with pytest.raises(ValueError, match="reduction must be one of"):
        BCEWithLogitsLoss(reduction="avg")
    with pytest.raises(ValueError, match="unknown loss 'iou'"):
        build_loss("iou")
    with pytest.raises(ValueError, match="pos_weight must be >= 0"):
        BCEWithLogitsLoss(pos_weight=-1.0)
    with pytest.raises(ValueError, match=r"pos_weight of shape \(3,\) does not broadcast"):
        BCEWithLogitsLoss(pos_weight=np.ones(3))(np.zeros((2, 3, 2)), np.zeros((2, 3, 2)))
    with pytest.raises(ValueError, match="smooth must be > 0"):
        DiceLoss(smooth=0.0)
    with pytest.raises(ValueError, match="CombinedLoss: expected a non-empty list"):
        CombinedLoss([])


def test_build_loss_names():
    assert isinstance(build_loss("bce"), BCEWithLogitsLoss)
    assert isinstance(build_loss("Squared_Hinge"), SquaredHingeLoss)
    assert isinstance(build_loss("focal", gamma=1.0), FocalLoss) and build_loss("focal", gamma=1.0).gamma == 1.0
    combo = build_loss("bce+dice")
    assert isinstance(combo, CombinedLoss) and combo.weights == [1.0, 1.0]
    assert [type(m).__name__ for m in combo.losses] == ["BCEWithLogitsLoss", "DiceLoss"]


# -- PyTorch parity ---------------------------------------------------------------------------------------
def _torch_reference(name, x, t):
    """The loss and its autograd gradient, written directly in PyTorch (formulas from the PyTorch/torchvision
    definitions, not from minideeplab)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    xt = torch.tensor(x, requires_grad=True)
    tt = torch.tensor(t)
    if name == "bce":
        loss = F.binary_cross_entropy_with_logits(xt, tt)
    elif name == "bce_sum":
        loss = F.binary_cross_entropy_with_logits(xt, tt, reduction="sum")
    elif name == "bce_pos_weight":
        loss = F.binary_cross_entropy_with_logits(xt, tt, pos_weight=torch.tensor(3.0, dtype=torch.float64))
    elif name == "focal":   # torchvision.ops.sigmoid_focal_loss(alpha=0.25, gamma=2, reduction="mean")
        p = torch.sigmoid(xt)
        ce = F.binary_cross_entropy_with_logits(xt, tt, reduction="none")
        p_t = p * tt + (1 - p) * (1 - tt)
        loss = (ce * (1 - p_t) ** 2 * (0.25 * tt + 0.75 * (1 - tt))).mean()
    elif name == "hinge":
        loss = torch.relu(1 - (2 * tt - 1) * xt).mean()
    elif name == "squared_hinge":
        loss = (torch.relu(1 - (2 * tt - 1) * xt) ** 2).mean()
    elif name == "dice":
        p = torch.sigmoid(xt)
        loss = 1 - (2 * (p * tt).sum() + 1) / (p.sum() + tt.sum() + 1)
    loss.backward()
    return loss.item(), xt.grad.numpy()


@pytest.mark.parametrize("name", ["bce", "bce_sum", "bce_pos_weight", "focal", "hinge", "squared_hinge", "dice"])
def test_parity_with_torch(xp, rng, name):
    x, t = _case(np, rng)
    ref_value, ref_grad = _torch_reference(name, x, t)
    loss = LOSS_FACTORIES[name]()
    value = float(loss(xp.asarray(x), xp.asarray(t)))
    grad = to_numpy(loss.backward())
    assert value == pytest.approx(ref_value, rel=1e-13)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-15 * np.abs(ref_grad).max())
