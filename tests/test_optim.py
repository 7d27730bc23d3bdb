"""Optimizers against torch.optim and hand-worked steps; schedules against closed forms; exact resume."""
import math

import numpy as np
import pytest

from minideeplab.backend import get_array_module, to_numpy
from minideeplab.nn import Parameter
from minideeplab.optim import (
    SGD,
    Adam,
    AdamW,
    ConstantLR,
    CosineLR,
    PolyLR,
    build_optimizer,
    build_scheduler,
)

SHAPES = [(3, 4), (5,), (2, 1, 3, 3)]


def _grads(arrays, k):
    """A gradient that depends on the current parameters (so trajectories, not just sums, must match)."""
    return [0.5 * a + np.sin(a + k) + 0.1 * k for a in arrays]


CONFIGS = [
    ("sgd", {}),
    ("sgd", {"momentum": 0.9}),
    ("sgd", {"momentum": 0.9, "weight_decay": 1e-2}),
    ("sgd", {"momentum": 0.8, "nesterov": True, "weight_decay": 5e-3}),
    ("sgd", {"momentum": 0.9, "dampening": 0.3}),
    ("adam", {}),
    ("adam", {"weight_decay": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6}),
    ("adamw", {}),
    ("adamw", {"weight_decay": 0.1, "betas": (0.85, 0.95)}),
]


@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=[f"{n}-{'-'.join(k) or 'plain'}" for n, k in CONFIGS])
def test_five_steps_match_torch(xp, rng, name, kwargs):
    torch = pytest.importorskip("torch")
    init = [rng.standard_normal(s) for s in SHAPES]
    params = [Parameter(xp.asarray(a.copy())) for a in init]
    opt = build_optimizer(name, params, lr=0.05, **kwargs)
    tparams = [torch.tensor(a.copy(), requires_grad=True) for a in init]
    topt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name](
        tparams, lr=0.05, **kwargs)
    for k in range(5):
        for p, g in zip(params, _grads([to_numpy(p.data) for p in params], k)):
            p.grad[...] = xp.asarray(g)
        opt.step()
        for p, g in zip(tparams, _grads([p.detach().numpy() for p in tparams], k)):
            p.grad = torch.tensor(g)
        topt.step()
    for p, tp in zip(params, tparams):
        np.testing.assert_allclose(to_numpy(p.data), tp.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_sgd_momentum_by_hand(xp):
    # lr 0.1, momentum 0.9, constant grad 1: buf 1 -> p 0.9; buf 1.9 -> p 0.71; buf 2.71 -> p 0.439
    p = Parameter(xp.asarray([1.0]))
    opt = SGD([p], lr=0.1, momentum=0.9)
    for expected in (0.9, 0.71, 0.439):
        p.grad[...] = 1.0
        opt.step()
        assert float(p.data[0]) == pytest.approx(expected, rel=1e-14)
    # Nesterov, same setting: step 1 uses g + 0.9*buf = 1.9 -> p 0.81
    q = Parameter(xp.asarray([1.0]))
    q.grad[...] = 1.0
    SGD([q], lr=0.1, momentum=0.9, nesterov=True).step()
    assert float(q.data[0]) == pytest.approx(0.81, rel=1e-14)


def test_adam_first_step_and_weight_decay_styles_by_hand(xp):
    # step 1: m_hat = g, v_hat = g^2, so p -= lr * g / (|g| + eps)
    p = Parameter(xp.asarray([1.0, -1.0]))
    p.grad[...] = xp.asarray([2.0, -0.5])
    Adam([p], lr=0.1).step()
    np.testing.assert_allclose(to_numpy(p.data), [1 - 0.1 * 2 / (2 + 1e-8), -1 + 0.1 * 0.5 / (0.5 + 1e-8)],
                               rtol=1e-14)
    # zero gradient, weight decay 0.5: Adam sees g = 0.5 * p = 1 and steps by lr; AdamW only shrinks p by lr*wd
    a, w = Parameter(xp.asarray([2.0])), Parameter(xp.asarray([2.0]))
    Adam([a], lr=0.1, weight_decay=0.5).step()
    AdamW([w], lr=0.1, weight_decay=0.5).step()
    assert float(a.data[0]) == pytest.approx(2 - 0.1 * 1 / (1 + 1e-8), rel=1e-14)
    assert float(w.data[0]) == pytest.approx(2 * (1 - 0.1 * 0.5), rel=1e-15)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_updates_in_place_and_state_on_param_device(xp, rng, name):
    p = Parameter(xp.asarray(rng.standard_normal((4, 3)).astype(np.float32)))
    before = to_numpy(p.data).copy()
    opt = build_optimizer(name, [p], lr=0.01, **({"momentum": 0.9} if name == "sgd" else {}))
    ref = p.data      # the optimizer moved the values into its flat buffer: this array from now on
    np.testing.assert_array_equal(to_numpy(ref), before)
    p.grad[...] = 1.0
    opt.step()
    assert p.data is ref and p.data.dtype == np.float32
    for arr in opt.state[0].values():
        assert type(arr) is type(p.data) and arr.dtype == np.float32 and arr.shape == (4, 3)
    opt.zero_grad()
    assert float(abs(p.grad).max()) == 0.0


def _reference_step(name, kwargs, lr, t, p, g, st):
    """One step of torch.optim's documented update for one parameter (arrays updated in place, state in st)."""
    wd = kwargs.get("weight_decay", 0.01 if name == "adamw" else 0.0)
    if name == "sgd":
        mom, damp = kwargs.get("momentum", 0.0), kwargs.get("dampening", 0.0)
        g = g + wd * p
        if mom:
            st["buf"] = g.copy() if "buf" not in st else mom * st["buf"] + (1 - damp) * g
            g = g + mom * st["buf"] if kwargs.get("nesterov") else st["buf"]
        p -= lr * g
        return
    b1, b2 = kwargs.get("betas", (0.9, 0.999))
    if name == "adamw":
        p *= 1 - lr * wd
    else:
        g = g + wd * p
    st["m"] = b1 * st.get("m", 0.0) + (1 - b1) * g
    st["v"] = b2 * st.get("v", 0.0) + (1 - b2) * g * g
    m_hat, v_hat = st["m"] / (1 - b1 ** t), st["v"] / (1 - b2 ** t)
    p -= lr * m_hat / (np.sqrt(v_hat) + kwargs.get("eps", 1e-8))


@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=[f"{n}-{'-'.join(k) or 'plain'}" for n, k in CONFIGS])
def test_flat_steps_match_the_per_parameter_rule(xp, rng, name, kwargs):
    # float32 and float64 parameters: two flat groups; the rule applied parameter by parameter in float64
    init = [rng.standard_normal(s) for s in SHAPES + [(7,), (2, 5)]]
    dtypes = [np.float64, np.float32, np.float64, np.float32, np.float64]
    params = [Parameter(xp.asarray(a.astype(d))) for a, d in zip(init, dtypes)]
    opt = build_optimizer(name, params, lr=0.05, **kwargs)
    ref, states = [a.copy() for a in init], [{} for _ in init]
    for t in range(1, 6):
        for p, g in zip(params, _grads(ref, t)):
            p.grad[...] = xp.asarray(g.astype(p.dtype))
        opt.step()
        for a, g, st in zip(ref, _grads(ref, t), states):
            _reference_step(name, kwargs, 0.05, t, a, g, st)
    for p, a in zip(params, ref):
        tol = 1e-12 if p.dtype == np.float64 else 2e-5
        np.testing.assert_allclose(to_numpy(p.data), a, rtol=tol, atol=tol)


def _address(a):
    return a.data.ptr if hasattr(a.data, "ptr") else a.__array_interface__["data"][0]


def test_parameters_and_grads_are_views_of_flat_buffers(xp, rng):
    params = [Parameter(xp.asarray(rng.standard_normal(s))) for s in SHAPES]
    params[1].grad[...] = 3.0
    params[2].zero_grad()
    opt = SGD(params, lr=0.1, momentum=0.5)
    (group,) = opt._groups
    sizes = [-(-int(np.prod(s)) * 8 // 256) * 256 // 8 for s in SHAPES]   # float64, each rounded up to 256 bytes
    assert group.data.shape == (sum(sizes),)
    starts = [_address(p.data) - _address(group.data) for p in params]
    assert starts == [0, 8 * sizes[0], 8 * (sizes[0] + sizes[1])]          # every view starts 256-byte aligned
    np.testing.assert_array_equal(to_numpy(params[1].grad), 3.0)        # values moved in, zero flag kept
    np.testing.assert_array_equal(to_numpy(params[2].grad), 0.0)
    np.testing.assert_array_equal(to_numpy(params[0].grad), 0.0)        # a fresh gradient: a pending zero, written now
    group.data[...] = 7.0
    group.grad[...] = 2.0
    for p in params:
        np.testing.assert_array_equal(to_numpy(p.data), 7.0)
        np.testing.assert_array_equal(to_numpy(p.grad), 2.0)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_step_follows_replaced_arrays_and_keeps_state(xp, rng, name):
    # replacing a parameter's arrays (what model.to(...) does) moves them in again at the next step, state kept
    kwargs = {"momentum": 0.9, "dampening": 0.2} if name == "sgd" else {}
    init = [rng.standard_normal(s) for s in SHAPES]
    runs = []
    for replace in (False, True):
        params = [Parameter(xp.asarray(a.copy())) for a in init]
        opt = build_optimizer(name, params, lr=0.05, **kwargs)
        for t in range(4):
            if replace and t == 2:
                params[0].data = params[0].data.copy()
                params[2].grad = xp.zeros_like(params[2].data)
            for p, g in zip(params, _grads([to_numpy(p.data) for p in params], t)):
                p.grad[...] = xp.asarray(g)
            opt.step()
        runs.append([to_numpy(p.data) for p in params])
        assert all(p.lives_in(d, g) for p, (d, g) in zip(params, opt._groups[0].views))
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def _run(opt, sched, params, steps, start):
    """Iterations start .. start+steps-1 of a training loop: gradients, optimizer step, schedule step."""
    for k in range(start, start + steps):
        for p, g in zip(params, _grads([to_numpy(p.data) for p in params], k)):
            p.grad[...] = get_array_module(p.data).asarray(g.astype(p.data.dtype))
        opt.step()
        sched.step()


RESUME = [("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}, "poly"),
          ("sgd", {"momentum": 0.9}, "cosine"),
          ("adam", {"weight_decay": 1e-3}, "constant"),
          ("adamw", {}, "poly")]


@pytest.mark.parametrize("name,kwargs,schedule", RESUME, ids=[r[0] + "-" + r[2] for r in RESUME])
def test_state_dict_round_trip_is_bit_identical(xp, rng, tmp_path, name, kwargs, schedule):
    init = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]

    def fresh():
        params = [Parameter(xp.asarray(a.copy())) for a in init]
        opt = build_optimizer(name, params, lr=0.03, **kwargs)
        return params, opt, build_scheduler(schedule, opt, total_steps=10, warmup_steps=2)

    params, opt, sched = fresh()
    _run(opt, sched, params, 4, 0)
    np.savez(tmp_path / "ckpt.npz", **{f"p{i}": to_numpy(p.data) for i, p in enumerate(params)},
             **{f"opt/{k}": v for k, v in opt.state_dict().items()},
             **{f"sched/{k}": v for k, v in sched.state_dict().items()})
    _run(opt, sched, params, 5, 4)                              # the uninterrupted run

    with np.load(tmp_path / "ckpt.npz", allow_pickle=False) as f:   # npz-friendly: no pickled objects
        saved = {k: f[k] for k in f.files}
    params2, opt2, sched2 = fresh()
    for i, p in enumerate(params2):
        p.data[...] = xp.asarray(saved[f"p{i}"])
    opt2.load_state_dict({k[4:]: v for k, v in saved.items() if k.startswith("opt/")})
    sched2.load_state_dict({k[6:]: v for k, v in saved.items() if k.startswith("sched/")})
    assert opt2.lr == pytest.approx(sched.lr_at(4)) and opt2.steps == 4
    _run(opt2, sched2, params2, 5, 4)                           # the resumed run
    for a, b in zip(params, params2):
        assert np.array_equal(to_numpy(a.data), to_numpy(b.data))   # bit-identical
    assert opt2.lr == opt.lr


def test_state_dict_is_a_snapshot_of_host_arrays(xp):
    p = Parameter(xp.asarray([1.0, 2.0]))
    opt = SGD([p], lr=0.1, momentum=0.9)
    assert "state.0.momentum_buffer" not in opt.state_dict()     # no buffer before the first step
    p.grad[...] = 1.0
    opt.step()
    sd = opt.state_dict()
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    assert sd["state.0.momentum_buffer"].tolist() == [1.0, 1.0]
    opt.step()
    assert sd["state.0.momentum_buffer"].tolist() == [1.0, 1.0]   # later steps do not change the snapshot
    assert str(sd["optimizer"]) == "SGD" and float(sd["momentum"]) == 0.9 and int(sd["steps"]) == 1


def test_load_state_dict_errors(xp):
    p = Parameter(xp.zeros((2, 2)))
    adam = Adam([p])
    p.grad[...] = 1.0
    adam.step()
    with pytest.raises(ValueError, match="SGD.load_state_dict: the state is from optimizer 'Adam', not SGD"):
        SGD([p], lr=0.1).load_state_dict(adam.state_dict())
    with pytest.raises(ValueError, match="the state has 1 parameters, this optimizer 2"):
        Adam([p, Parameter(xp.zeros(3))]).load_state_dict(adam.state_dict())
    with pytest.raises(ValueError, match=r"state.0.exp_avg has shape \(2, 2\), parameter 0 has shape \(4,\)"):
        Adam([Parameter(xp.zeros(4))]).load_state_dict(adam.state_dict())
    with pytest.raises(ValueError, match=r"unexpected keys \['bogus'\]"):
        Adam([p]).load_state_dict({**adam.state_dict(), "bogus": np.zeros(1)})
    two = SGD([p, Parameter(xp.zeros(3))], lr=0.1, momentum=0.9)
    two.step()
    with pytest.raises(ValueError, match="the state has momentum_buffer for 1 of 2 parameters"):
        two.load_state_dict({k: v for k, v in two.state_dict().items() if k != "state.1.momentum_buffer"})
    partial = {k: v for k, v in adam.state_dict().items() if k != "steps"}
    with pytest.raises(ValueError, match=r"Adam.load_state_dict: missing keys \['steps'\]"):
        Adam([p]).load_state_dict(partial)
    sched = PolyLR(adam, total_steps=5)
    with pytest.raises(ValueError, match=r"PolyLR.load_state_dict: missing keys \['power'\]"):
        PolyLR(adam, total_steps=5).load_state_dict({k: v for k, v in sched.state_dict().items() if k != "power"})
    with pytest.raises(ValueError, match="CosineLR.load_state_dict: the state is from schedule 'PolyLR'"):
        CosineLR(adam, total_steps=5).load_state_dict(sched.state_dict())


def test_constructor_errors():
    p = Parameter(np.zeros(2))
    with pytest.raises(ValueError, match="SGD: got an empty parameter list"):
        SGD([], lr=0.1)
    with pytest.raises(TypeError, match=r"SGD: parameter 0 is a ndarray, expected a Parameter"):
        SGD([np.zeros(2)], lr=0.1)
    with pytest.raises(ValueError, match="SGD: a parameter appears more than once in the list"):
        SGD([p, Parameter(np.zeros(3)), p], lr=0.1)
    with pytest.raises(ValueError, match=r"SGD: lr must be >= 0.0, got -0.1"):
        SGD([p], lr=-0.1)
    with pytest.raises(ValueError, match="Nesterov momentum needs momentum > 0"):
        SGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"Adam: beta2 must be in \[0.0, 1.0\), got 1.0"):
        Adam([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        build_optimizer("rmsprop", [p], lr=0.1)
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        build_scheduler("step", SGD([p], lr=0.1), 10)
    with pytest.raises(ValueError, match=r"warmup_steps must be an int in \[0, total_steps=10\), got 10"):
        PolyLR(SGD([p], lr=0.1), total_steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="total_steps must be a positive int"):
        CosineLR(SGD([p], lr=0.1), total_steps=0)
    assert isinstance(build_optimizer("AdamW", [p], lr=0.1), AdamW)
    assert AdamW([p]).weight_decay == 0.01                     # PyTorch's default


# -- schedules --------------------------------------------------------------------------------------------
def _lrs(sched, n):
    return [sched.optimizer.lr] + [sched.step() for _ in range(n)]


def test_poly_closed_form():
    opt = SGD([Parameter(np.zeros(1))], lr=0.01)
    lrs = _lrs(PolyLR(opt, total_steps=10), 11)
    assert lrs == pytest.approx([0.01 * (1 - t / 10) ** 0.9 for t in range(11)] + [0.0], rel=1e-15)
    assert lrs[5] == pytest.approx(0.01 * 0.5 ** 0.9) and lrs[10] == 0.0 and lrs[11] == 0.0


def test_poly_with_warmup():
    opt = SGD([Parameter(np.zeros(1))], lr=1.0)
    lrs = _lrs(PolyLR(opt, total_steps=10, warmup_steps=4, power=2.0), 10)
    # warm-up 1/4, 2/4, 3/4, 4/4; then (1 - s/6)^2 for s = t - 4
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, (5 / 6) ** 2, (4 / 6) ** 2, 0.25, (2 / 6) ** 2,
                                 (1 / 6) ** 2, 0.0], rel=1e-15)


def test_cosine_closed_form():
    opt = SGD([Parameter(np.zeros(1))], lr=1.1)
    lrs = _lrs(CosineLR(opt, total_steps=4, min_lr=0.1), 5)
    assert lrs == pytest.approx([1.1, 0.1 + (1 + math.sqrt(0.5)) / 2, 0.6, 0.1 + (1 - math.sqrt(0.5)) / 2,
                                 0.1, 0.1], rel=1e-14)
    warm = _lrs(CosineLR(SGD([Parameter(np.zeros(1))], lr=1.0), total_steps=4, warmup_steps=2), 3)
    assert warm == pytest.approx([0.5, 1.0, 1.0, 0.5], rel=1e-14)


def test_constant_with_warmup():
    opt = SGD([Parameter(np.zeros(1))], lr=0.2)
    assert _lrs(ConstantLR(opt, total_steps=5, warmup_steps=2), 6) == pytest.approx([0.1, 0.2] + [0.2] * 5)


def test_scheduler_state_round_trip():
    opt = SGD([Parameter(np.zeros(1))], lr=0.3)
    sched = CosineLR(opt, total_steps=20, warmup_steps=3, min_lr=0.01)
    _lrs(sched, 7)
    sd = sched.state_dict()
    rest = _lrs(sched, 5)[1:]
    opt2 = SGD([Parameter(np.zeros(1))], lr=99.0)
    sched2 = CosineLR(opt2, total_steps=20)
    sched2.load_state_dict(sd)
    assert opt2.lr == sched.lr_at(7) and sched.lr_at(7) != 99.0   # load sets the optimizer's lr
    assert sched2.last_step == 7 and sched2.min_lr == 0.01 and sched2.warmup_steps == 3
    assert _lrs(sched2, 5)[1:] == rest                         # identical floats
