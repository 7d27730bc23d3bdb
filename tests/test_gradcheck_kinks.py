"""``check_module(..., kink_aware=True)``: an entry whose central difference straddles a ReLU kink is left out and
counted, only when the kink explains its error; a wrong backward still fails, on a whole model too."""
import numpy as np
import pytest

from minideeplab import nn
from minideeplab.gradcheck import check_function, check_module
from minideeplab.models import DeepLabConfig, build_deeplab


def relu_function(leak=0.0, scale=1.0):
    """``relu`` with its vector-Jacobian product; ``leak``/``scale`` plant a wrong backward."""
    def f(x):
        return np.maximum(x, 0.0), lambda dout: dout * np.where(x > 0, scale, leak)
    return f


X = np.array([3e-6, 1.0, -2.0, 0.5, -0.25, 2.0])     # the first entry is 3e-6 from the kink, inside eps = 1e-5


def test_a_straddled_kink_fails_the_plain_check_and_is_explained_by_the_kink_aware_one():
    plain = check_function(relu_function(), X.copy(), eps=1e-5, raise_on_fail=False, rng=np.random.default_rng(0))
    assert not plain.passed and plain.rows[0].kinks == 0
    # the central difference is (1.3e-5 - 0) / 2e-5 = 0.65 of the slope: an error of 0.35, half the one-sided jump
    assert plain.worst == pytest.approx(0.35, rel=1e-6)
    aware = check_function(relu_function(), X.copy(), eps=1e-5, kink_aware=True, rng=np.random.default_rng(0))
    assert aware.passed and aware.kinks == 1 and aware.worst < 1e-9
    assert "kinks" in aware.table()


@pytest.mark.parametrize("leak, scale", [(0.01, 1.0), (0.0, 1.001)], ids=["leaky backward", "scaled backward"])
def test_a_wrong_backward_still_fails(leak, scale):
    result = check_function(relu_function(leak, scale), X.copy(), eps=1e-5, kink_aware=True, raise_on_fail=False,
                            rng=np.random.default_rng(0))
    assert not result.passed and result.worst > 1e-4


def test_an_error_larger_than_the_kink_explains_is_not_left_out():
    x = np.array([3e-6])              # only the kink entry: the analytic 1.5 matches neither side (1.0 and 0.3)
    result = check_function(relu_function(scale=1.5), x, eps=1e-5, kink_aware=True, raise_on_fail=False,
                            rng=np.random.default_rng(0))
    assert not result.passed and result.kinks == 0


def test_a_steep_smooth_loss_is_not_excused():
    """Large curvature also makes the one-sided differences disagree, but puts the derivative in their middle:
    a wrong derivative there still fails."""
    def steep(x):                     # tanh(1e4 x) near 0: eps * f'' is large, and there is no kink
        return np.tanh(1e4 * x), lambda dout: dout * 1e4 * (1 - np.tanh(1e4 * x) ** 2) * 1.01   # 1 % wrong
    x = np.array([2e-5])
    result = check_function(steep, x, eps=1e-6, kink_aware=True, raise_on_fail=False, rng=np.random.default_rng(0))
    assert not result.passed and result.kinks == 0


def test_a_tensor_mostly_left_out_is_not_checked():
    x = np.array([3e-6, -4e-6, 2e-6, 1.0])         # three of four entries straddle the kink
    result = check_function(relu_function(), x, eps=1e-5, kink_aware=True, raise_on_fail=False,
                            rng=np.random.default_rng(0))
    assert result.kinks == 3 and result.worst < 1e-9 and not result.passed
    assert result.table().rstrip().endswith("NO")


def _tiny(seed=0):
    rng = np.random.default_rng(seed)
    model = build_deeplab(DeepLabConfig.small(dropout=0.0), rng=rng, dtype=np.float64)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data[...] = rng.uniform(0.5, 1.5, m.weight.shape)
            m.bias.data[...] = rng.normal(0.0, 0.5, m.bias.shape)
    return model, rng.standard_normal((2, 3, 16, 16)), rng


def _grads(model, x):
    model.zero_grad()
    model.backward(np.ones_like(model(x)))
    return np.concatenate([p.grad.ravel() for p in model.parameters()])


def test_whole_model_with_a_planted_relu_bug_fails(monkeypatch):
    """The notebook's whole-model check (kink-aware, eps 1e-6) passes on the real backward and fails when every
    ReLU's backward leaks 1 % of the gradient where its input was negative."""
    model, x, rng = _tiny()
    result = check_module(model, x, eps=1e-6, rtol=1e-5, samples=2, full_limit=2, kink_aware=True, rng=rng)
    assert result.passed
    clean = _grads(*_tiny()[:2])
    original = nn.ReLU.backward

    def leaky(self, dout):
        right = original(self, dout)
        return right + 0.01 * (dout - right)        # 1 % of dout where the mask was 0
    monkeypatch.setattr(nn.ReLU, "backward", leaky)
    assert np.abs(_grads(*_tiny()[:2]) - clean).max() > 1e-4      # the planted bug reaches the model's backward
    model, x, rng = _tiny()
    with pytest.raises(AssertionError, match="gradient check failed"):
        check_module(model, x, eps=1e-6, rtol=1e-5, samples=2, full_limit=2, kink_aware=True, rng=rng)
