"""The trainer's captured step (graph_step.py): on the CPU its capture path against the eager loop, and on a GPU the
real CUDA graphs against eager steps.

On the CPU a ``profiler.CountingArray`` with ``capturing = True`` stands for a device array under capture (no host
read allowed: each one is counted), and ``StandIn`` for ``backend.GraphStep``: it runs the step at every call; on a
"replay" the step sees the Python counters (lr, step counts) as they were at the capture, and afterwards what its
Python did that a real replay does not do is undone (the counters advanced, the dropout masks drawn ahead
consumed), so the code around the step must do what it must do on a GPU.
"""
import numpy as np
import pytest

from minideeplab.backend import cuda_available, to_numpy
from minideeplab.checkpoint import load_checkpoint
from minideeplab.data import DataLoader, SyntheticShapes
from minideeplab.graph_step import CapturedEvalStep, CapturedTrainStep, check_binary
from minideeplab.losses import build_loss
from minideeplab.models import DeepLabConfig, build_deeplab
from minideeplab.nn import Dropout, Parameter, threads
from minideeplab.optim import SGD, Adam, AdamW, ConstantLR, CosineLR, DeviceCounters, PolyLR, build_scheduler
from minideeplab.profiler import CountingArray
from minideeplab.train import TrainConfig, Trainer, evaluate

TINY = {"model": "small", "image_size": 32, "batch_size": 4, "train_size": 12, "val_size": 6, "epochs": 2,
        "lr": 3e-3, "warmup_steps": 2, "seed": 3}


@pytest.fixture
def capturing(monkeypatch):
    """CountingArrays behave as device arrays under capture while ``StandIn`` runs a step."""
    monkeypatch.setattr(CountingArray, "capturing", False)
    CountingArray.syncs.clear()


class StandIn:
    """``backend.GraphStep`` on the CPU (see the module docstring). ``calls`` records each call's kind."""

    def __init__(self, step, warmup=2, optimizer=None, scheduler=None, model=None):
        self.step, self.warmup, self.runs, self.calls, self.frozen = step, warmup, 0, [], None
        self.optimizer, self.scheduler, self.model = optimizer, scheduler, model

    @property
    def captured(self):
        return self.runs > self.warmup

    def __call__(self):
        kind = "warmup" if self.runs < self.warmup else "capture" if self.runs == self.warmup else "replay"
        before = None
        if self.optimizer is not None:
            numbers = (self.optimizer.steps, self.scheduler.last_step, self.optimizer.lr)
            if kind == "capture":
                self.frozen = numbers
            elif kind == "replay":     # the Python numbers a replay sees are the capture's
                before = numbers, [(d, d.ahead_ready) for d in self.model.modules() if isinstance(d, Dropout)]
                self.optimizer.steps, self.scheduler.last_step, self.optimizer.lr = self.frozen
        CountingArray.syncs.clear()
        CountingArray.capturing = True
        try:
            self.step()
        finally:
            CountingArray.capturing = False
        assert sum(CountingArray.syncs.values()) == 0, f"host reads in a captured step: {dict(CountingArray.syncs)}"
        if before is not None:            # a replay runs no Python: undo what the Python of the step did
            (self.optimizer.steps, self.scheduler.last_step, self.optimizer.lr), flags = before
            for d, ready in flags:
                d.ahead_ready = ready
        self.calls.append(kind)
        self.runs += 1


def _counting_trainer(cfg, captured: bool):
    """A trainer whose arrays are CountingArrays; ``captured``: its steps and validation go the capture path."""
    trainer = Trainer(cfg, progress=False, figures=False)
    trainer.model._apply(lambda a: a.view(CountingArray))        # as .to(device): parameters and buffers
    if captured:
        runners = []

        def runner(step):
            runners.append(StandIn(step, optimizer=trainer.optimizer, scheduler=trainer.scheduler,
                                   model=trainer.model))
            return runners[-1]
        trainer.captured = CapturedTrainStep(trainer.model, trainer.loss_fn, trainer.optimizer, trainer.scheduler,
                                             cfg.threshold, runner=runner)
        trainer.captured_eval = CapturedEvalStep(trainer.model, runner=StandIn)
        trainer.runners = runners
    return trainer


def _state(trainer):
    state = {f"model.{k}": np.array(v) for k, v in trainer.model.state_dict().items()}
    state.update({f"optim.{k}": np.array(v) for k, v in trainer.optimizer.state_dict().items()})
    state.update({f"sched.{k}": np.array(v) for k, v in trainer.scheduler.state_dict().items()})
    return state


def _history(trainer):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in trainer.history]


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, f"differ: {different[:5]}"


# -- the schedule and the optimizers on device counters ----------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda opt: PolyLR(opt, total_steps=50, warmup_steps=7), lambda opt: PolyLR(opt, total_steps=50, power=2.0),
    lambda opt: CosineLR(opt, total_steps=40, warmup_steps=5, min_lr=1e-4), lambda opt: CosineLR(opt, 33),
    lambda opt: ConstantLR(opt, total_steps=20, warmup_steps=3), lambda opt: ConstantLR(opt)])
def test_device_schedule_equals_lr_at_for_every_step(make):
    """``lr_of`` (the schedule as array arithmetic, what a captured step runs) gives ``lr_at(t)`` bit for bit for
    every t of the run and beyond its end, on 0-d float64 arrays as the device counters hold them."""
    sched = make(SGD([Parameter(np.zeros(2))], lr=0.02))
    for t in range(sched.total_steps + 3):
        assert float(sched.lr_of(np.array(float(t)))) == sched.lr_at(t), t


@pytest.mark.parametrize("name, make", [
    ("sgd", lambda ps: SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3)),
    ("nesterov", lambda ps: SGD(ps, lr=0.05, momentum=0.9, nesterov=True)),
    ("adam", lambda ps: Adam(ps, lr=1e-2, weight_decay=1e-3)),
    ("adamw", lambda ps: AdamW(ps, lr=1e-2, weight_decay=1e-2))])
@pytest.mark.parametrize("schedule", ["poly", "cosine"])
def test_optimizer_on_device_counters_updates_as_with_python_numbers(capturing, name, make, schedule):
    """Two float32 optimizers over the same parameters and gradients, one reading lr and step count from device
    counters (advanced by the schedule's ``step`` as a captured step advances them, no host read; its Python numbers
    held still, as replays leave them), one from Python numbers: the same parameters and state bit for bit at every
    step of a run with warm-up, the same state_dict."""
    rng = np.random.default_rng(0)
    shapes = [(5, 3), (7,), (2, 3, 3, 3)]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(12)]
    runs = []
    for held in (False, True):
        params = [Parameter(a.copy().view(CountingArray)) for a in init]
        opt = make(params)
        sched = build_scheduler(schedule, opt, total_steps=10, warmup_steps=3)
        if held:
            counters = DeviceCounters(opt, sched)
            still = opt.steps, sched.last_step, opt.lr
        trajectory = []
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.copy().view(CountingArray)
            CountingArray.syncs.clear()
            CountingArray.capturing = held
            opt.step()
            sched.step()
            CountingArray.capturing = False
            assert sum(CountingArray.syncs.values()) == 0
            if held:                     # only the device counters move
                opt.steps, sched.last_step, opt.lr = still
            trajectory.append([np.array(p.data) for p in params])
        if held:
            assert (float(counters.steps), float(counters.t), float(counters.lr)) == (12, 12, sched.lr_at(12))
            counters.advance_host(11, 11)            # the Python numbers after the last step, as a trainer sets them
        runs.append((trajectory, opt.state_dict()))
    (eager, eager_state), (held, held_state) = runs
    for k, (a, b) in enumerate(zip(eager, held)):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(y, x, err_msg=f"step {k + 1}")
    _assert_equal(eager_state, held_state)


def test_device_counters_follow_a_loaded_state():
    """After ``load_state_dict`` (a resumed run) the counters take the loaded step counts, and the learning rate
    computed from them on the device; an lr set by hand is taken as it is."""
    opt = AdamW([Parameter(np.zeros(3, dtype=np.float32))], lr=0.1)
    sched = CosineLR(opt, total_steps=20, warmup_steps=4)
    counters = DeviceCounters(opt, sched)
    assert opt.held is counters and (float(counters.steps), float(counters.t)) == (0, 0)
    other = AdamW([Parameter(np.zeros(3, dtype=np.float32))], lr=0.1)
    other_sched = CosineLR(other, total_steps=20, warmup_steps=4)
    for _ in range(7):
        other.params[0].grad = np.ones(3, dtype=np.float32)
        other.step()
        other_sched.step()
    opt.load_state_dict(other.state_dict())
    sched.load_state_dict(other_sched.state_dict())
    counters.follow_host()
    assert (float(counters.steps), float(counters.t), float(counters.lr)) == (7, 7, sched.lr_at(7))
    opt.lr = 0.5
    counters.follow_host()
    assert float(counters.lr) == 0.5
    counters.detach()
    assert opt.held is None
    with pytest.raises(ValueError, match="the scheduler sets the lr of another optimizer"):
        DeviceCounters(opt, other_sched)


# -- the trainer's capture path against its eager loop ---------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_capture_path_trains_as_the_eager_loop(capturing, monkeypatch, optimizer):
    """Two epochs of the tiny run (3 steps each, warm-up 2, dropout): the trainer's captured step (two warm-up
    steps, the capture, then replays that run no Python) and its captured validation (the last val batch smaller,
    its own graph), with no host read inside a step, give bit for bit what the eager loop gives on the same layer
    paths (every array reading as under capture: the fused heads' general path, the dense layers' unscaled
    backward): weights, optimizer and schedule state, losses and metrics. Against the eager loop on its own paths
    (host reads allowed), the numbers agree to float32 rounding, as six Adam steps amplify it."""
    cfg = TrainConfig(**TINY, optimizer=optimizer)
    # the eager validation of a Module runs under no_grad, which on the CPU splits a plain NumPy batch over the BLAS
    # threads (nn.threads: other matrix sizes, other float rounding); a captured eval forward is never split
    monkeypatch.setattr(threads, "enabled", False)
    monkeypatch.setattr(CountingArray, "capturing", True)
    same_paths = _counting_trainer(cfg, captured=False)
    same_paths.fit()
    monkeypatch.setattr(CountingArray, "capturing", False)
    eager = _counting_trainer(cfg, captured=False)
    eager.fit()
    captured = _counting_trainer(cfg, captured=True)
    captured.fit()
    assert [r.calls for r in captured.runners] == [["warmup", "warmup", "capture", "replay", "replay", "replay"]]
    assert captured.captured.captured and captured.optimizer.held is captured.captured.counters
    assert sorted(captured.captured_eval.graphs) == [((2, 3, 32, 32), np.dtype(np.float32)),
                                                     ((4, 3, 32, 32), np.dtype(np.float32))]
    _assert_equal(_state(same_paths), _state(captured))
    assert _history(captured) == _history(same_paths)
    assert captured.global_step == 6 and captured.optimizer.steps == 6 and captured.scheduler.last_step == 6
    # the replays consumed the masks drawn ahead: a forward run outside the step draws its own
    assert [d.ahead_ready for d in captured.captured.dropouts] == [False]
    a, b = _state(eager), _state(captured)     # (Adam moves a weight by ~lr whatever the size of its gradient)
    for k in a:
        if a[k].dtype.kind == "f":
            np.testing.assert_allclose(b[k], a[k], rtol=1e-3, atol=1e-5, err_msg=k)   # AdamW: 1.6e-4 seen
        else:
            np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    for r, q in zip(eager.history, captured.history):
        for k in ("train_loss", "train_iou", "val_loss", "val_iou"):
            assert q[k] == pytest.approx(r[k], rel=1e-5, abs=1e-6), k


def test_capture_path_checkpoints_resume_bit_identically(capturing, tmp_path):
    """A captured run stopped after its 2nd step saves last.npz; a new captured trainer resumed from it (counters
    written back onto the device, a new capture) finishes with the uninterrupted captured run's state bit for bit."""
    cfg = TrainConfig(**TINY)
    reference = _counting_trainer(cfg, captured=True)
    reference.fit()
    stopped = _counting_trainer(cfg, captured=True)
    stopped.out_dir = tmp_path
    stopped.on_step_end = lambda t: t.request_stop() if t.global_step == 2 else None
    with pytest.raises(KeyboardInterrupt):
        stopped.fit()
    meta = load_checkpoint(tmp_path / "last.npz").meta
    assert (meta["epoch"], meta["step_in_epoch"], meta["global_step"]) == (0, 2, 2)
    resumed = _counting_trainer(cfg, captured=True)
    resumed.load_state(tmp_path / "last.npz")
    resumed.fit()
    _assert_equal(_state(reference), _state(resumed))
    assert _history(resumed) == _history(reference)


def test_a_new_optimizer_state_makes_a_new_capture(capturing):
    """The graph reads the optimizer's flat buffers; ``load_state_dict`` moves the parameters into new ones, and so
    does the next step after ``model.to`` replaced their arrays: the next step captures anew instead of replaying a
    graph that updates the old buffers."""
    trainer = _counting_trainer(TrainConfig(**TINY), captured=True)
    batches = trainer.train_loader.batches(trainer.train_loader.epoch_order())
    for _ in range(2):
        trainer.train_step(*next(batches))
    trainer.optimizer.load_state_dict(trainer.optimizer.state_dict())
    trainer.train_step(*next(batches))
    assert [r.calls for r in trainer.runners] == [["warmup", "warmup"], ["warmup"]]
    trainer.model._apply(lambda a: np.array(a).view(CountingArray))       # new arrays, as model.to makes
    trainer.train_step(*next(iter(trainer.train_loader)))
    assert [r.calls for r in trainer.runners] == [["warmup", "warmup"], ["warmup"], ["warmup"]]
    assert all(p.lives_in(*v) for g in trainer.optimizer._groups for p, v in
               zip((trainer.optimizer.params[i] for i in g.idx), g.views))


def test_captured_step_checks_masks_and_shape_on_the_host(capturing):
    with pytest.raises(ValueError, match=r"training masks must be binary with values in \{0, 1\}, got 1 other"):
        check_binary(np.array([0.0, 1.0, 0.5]))
    trainer = _counting_trainer(TrainConfig(**TINY), captured=True)
    images, masks = next(iter(trainer.train_loader))
    bad = masks.copy()
    bad[0, 0, 0, 0] = 2.0
    with pytest.raises(ValueError, match="training masks must be binary"):
        trainer.train_step(images, bad)
    trainer.train_step(images, masks)
    with pytest.raises(ValueError, match=r"captured for batches \(4, 3, 32, 32\).*got \(2, 3, 32, 32\)"):
        trainer.train_step(images[:2], masks[:2])


def test_captured_eval_matches_evaluate_and_follows_new_weights(capturing):
    """``evaluate`` through ``CapturedEvalStep`` (one graph per batch shape, the last batch smaller) gives the eager
    metrics and loss exactly; parameters moved into new arrays make new graphs."""
    model = build_deeplab(DeepLabConfig.small(output_stride=8), rng=np.random.default_rng(0))
    model._apply(lambda a: a.view(CountingArray))
    loader = DataLoader(SyntheticShapes(7, 32, seed=1, split=1), batch_size=3)
    loss_fn = build_loss("bce+dice")
    eager = evaluate(model, loader, loss_fn)
    step = CapturedEvalStep(model, runner=StandIn)
    for _ in range(4):                 # warm-up, warm-up, capture, replay for the two full batches' shape
        assert evaluate(step, loader, loss_fn) == eager
    assert len(step.graphs) == 2 and not model.training
    graph = step.graphs[((3, 3, 32, 32), np.dtype(np.float32))]
    assert graph.runner.calls == ["warmup", "warmup", "capture", "replay", "replay", "replay", "replay", "replay"]
    model._apply(lambda a: np.array(a).view(CountingArray))     # new arrays (as model.to does)
    assert evaluate(step, loader, loss_fn) == eager
    assert sorted(g.runner.runs for g in step.graphs.values()) == [1, 2]          # new graphs, warming up


def test_trainer_on_the_cpu_runs_eagerly():
    trainer = Trainer(TrainConfig(**TINY), progress=False, figures=False)
    assert trainer.captured is None and trainer.captured_eval is None and trainer.optimizer.held is None


# -- on a GPU: the real graphs -------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a GPU")


def _gpu_run(cuda_graph: bool, stop_at=None, out_dir=None, as_captured=False, **overrides):
    cfg = TrainConfig(**{**TINY, "device": "cuda", "cuda_graph": cuda_graph, **overrides})
    trainer = Trainer(cfg, out_dir=out_dir, progress=False, figures=False)
    if stop_at is not None:
        trainer.on_step_end = lambda t: t.request_stop() if t.global_step == stop_at else None
    if as_captured:              # the eager loop on the captured path (cuBLAS GEMMs, general fused heads)
        from minideeplab import backend
        with backend.as_captured():
            trainer.fit()
    else:
        trainer.fit()
    return trainer


def _close(a, b, rtol, atol):
    assert a.keys() == b.keys()
    for k in a:
        if a[k].dtype.kind == "f":
            np.testing.assert_allclose(b[k], a[k], rtol=rtol, atol=atol, err_msg=k)
        else:
            np.testing.assert_array_equal(b[k], a[k], err_msg=k)


def _close_history(a, b, rel):
    for r, q in zip(a.history, b.history):
        for k in ("train_loss", "val_loss"):
            assert q[k] == pytest.approx(r[k], rel=rel), k
        for k in ("train_iou", "val_iou"):     # a logit at the threshold may round across it: a pixel or two
            assert q[k] == pytest.approx(r[k], abs=5e-3), k


# (max-pool backward adds with atomics on a GPU, in no fixed order: two runs of the same steps differ at float32
# rounding, which Adam amplifies, ~2e-4 on the CPU for rounding differences; hence the tolerances)
@gpu
@pytest.mark.parametrize("optimizer, rtol, atol", [("sgd", 1e-4, 1e-6), ("adamw", 1e-3, 1e-5)])
def test_cuda_graph_trainer_replays_train_as_the_same_steps_run_eagerly(optimizer, rtol, atol):
    """Two epochs (3 steps each, warm-up, dropout; validation's last batch smaller): the trainer's CUDA graph
    replays against its eager loop run on the captured path (the same kernels: cuBLAS GEMMs, the general fused
    heads), then against the plain eager loop (CuPy's GEMMs, which round apart in the last bits)."""
    graphed = _gpu_run(True, optimizer=optimizer)
    assert graphed.captured.captured and len(graphed.captured_eval.graphs) == 2
    assert graphed.optimizer.steps == graphed.scheduler.last_step == 6
    same_path = _gpu_run(False, as_captured=True, optimizer=optimizer)
    assert same_path.captured is None
    _close(_state(same_path), _state(graphed), rtol=rtol, atol=atol)
    _close_history(same_path, graphed, rel=1e-5)
    eager = _gpu_run(False, optimizer=optimizer)
    _close(_state(eager), _state(graphed), rtol=10 * rtol, atol=10 * atol)
    _close_history(eager, graphed, rel=1e-4)


@gpu
def test_cuda_graph_trainer_run_resumes(tmp_path):
    """A captured run stopped after step 2 and resumed (a new capture, the counters written back to the device)
    ends where the uninterrupted captured run ends, to the GPU's rounding."""
    reference = _gpu_run(True)
    with pytest.raises(KeyboardInterrupt):
        _gpu_run(True, stop_at=2, out_dir=tmp_path)
    resumed = Trainer.from_checkpoint(tmp_path / "last.npz", progress=False, figures=False)
    assert resumed.captured is not None and resumed.global_step == 2
    resumed.fit()
    assert resumed.captured.captured and resumed.optimizer.steps == 6
    _close(_state(reference), _state(resumed), rtol=1e-3, atol=1e-5)
    _close_history(reference, resumed, rel=1e-5)


@gpu
def test_cuda_graph_validation_with_a_smaller_last_batch():
    """Validation through ``CapturedEvalStep`` (batches of 4 and a last one of 2: two graphs) gives the eager metrics."""
    model = build_deeplab(DeepLabConfig.small(output_stride=8), rng=np.random.default_rng(0)).to("cuda")
    loader = DataLoader(SyntheticShapes(6, 32, seed=1, split=1), batch_size=4)
    loss_fn = build_loss("bce+dice")
    eager = evaluate(model, loader, loss_fn, device="cuda")
    step = CapturedEvalStep(model)
    for _ in range(4):
        got = evaluate(step, loader, loss_fn, device="cuda")
        for k in ("tp", "fp", "fn", "tn"):
            assert abs(got[k] - eager[k]) <= 2, k        # a logit at the threshold may round across it
        assert got["loss"] == pytest.approx(eager["loss"], rel=1e-5)
    assert all(g.runner.captured for g in step.graphs.values()) and len(step.graphs) == 2
    assert to_numpy(step.graphs[((4, 3, 32, 32), np.dtype(np.float32))].logits).shape == (4, 1, 32, 32)
