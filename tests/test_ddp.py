"""The way out to PyTorch: a minideeplab run continued with DistributedDataParallel and written back.

- the pieces (``torch_run``): loss, optimizer state and schedule carried over, checked against minideeplab's own;
- one process continuing a run gives what minideeplab's Trainer gives on the same steps, to float32 rounding;
- two CPU processes (gloo) keep equal weights, lower the loss on a fixed batch, and write a checkpoint that
  minideeplab evaluates with the numbers PyTorch's validation reported.
"""
import re
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from minideeplab.checkpoint import load_checkpoint, load_model  # noqa: E402
from minideeplab.losses import build_loss  # noqa: E402
from minideeplab.nn.module import Parameter  # noqa: E402
from minideeplab.optim import SGD, Adam, AdamW, build_scheduler  # noqa: E402
from minideeplab.torch_ddp import free_port, launch  # noqa: E402
from minideeplab.torch_run import (  # noqa: E402
    HostDropout,
    optimizer_state_back,
    restore_schedule,
    sum_over_processes,
    torch_loss,
    torch_optimizer,
)
from minideeplab.train import TrainConfig, Trainer, evaluate  # noqa: E402

LOSSES = ["bce", "dice", "focal", "hinge", "squared_hinge", "bce+dice", "focal+dice"]


# -- the pieces ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LOSSES)
def test_torch_loss_equals_ours_value_and_gradient(name):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, (3, 1, 7, 9))
    t = (rng.random(x.shape) < 0.4).astype(np.float64)
    ours = build_loss(name)
    value, grad = float(ours(x, t)), ours.backward()
    tx = torch.from_numpy(x).requires_grad_()
    tvalue = torch_loss(name)(tx, torch.from_numpy(t))
    tvalue.backward()
    assert tvalue.item() == pytest.approx(value, rel=1e-12)
    np.testing.assert_allclose(tx.grad.numpy(), grad, rtol=1e-9, atol=1e-15)


def _global_dice_worker(rank, world, port, x, t, out):
    import os

    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        tx = torch.from_numpy(x[shard]).requires_grad_()
        loss = torch_loss("bce+dice", sum_over_processes)(tx, torch.from_numpy(t[shard]))
        loss.backward()
        values = loss.detach().reshape(1)
        dist.all_reduce(values)
        out.put((rank, float(values) / world, tx.grad.numpy() / world))   # DDP divides the gradients by W
    finally:
        dist.destroy_process_group()


def test_loss_over_two_processes_is_the_global_batch_loss():
    """Each process sees half the batch; BCE is averaged and the Dice sums are summed over the processes, so the
    mean of the two losses and the averaged gradients are those of the whole batch in one process."""
    rng = np.random.default_rng(1)
    x = rng.normal(0, 2, (4, 1, 6, 6))
    t = (rng.random(x.shape) < 0.3).astype(np.float64)
    ours = build_loss("bce+dice")
    value, grad = float(ours(x, t)), ours.backward()
    queue = torch.multiprocessing.get_context("spawn").SimpleQueue()
    torch.multiprocessing.spawn(_global_dice_worker, args=(2, free_port(), x, t, queue), nprocs=2)
    results = sorted(queue.get() for _ in range(2))
    for rank, mean_loss, shard_grad in results:
        assert mean_loss == pytest.approx(value, rel=1e-12)
        np.testing.assert_allclose(shard_grad, grad[rank * 2:(rank + 1) * 2], rtol=1e-9, atol=1e-15)
    # the same gradients without the sum over processes (each its own Dice) would differ: the check can fail
    local = torch.from_numpy(x[:2]).requires_grad_()
    torch_loss("bce+dice")(local, torch.from_numpy(t[:2])).backward()
    assert not np.allclose(local.grad.numpy() / 2, grad[:2], rtol=1e-3)


@pytest.mark.parametrize("make", [lambda p: SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
                                  lambda p: SGD(p, lr=0.05), lambda p: Adam(p, lr=1e-2, weight_decay=1e-3),
                                  lambda p: AdamW(p, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)],
                         ids=["sgd-momentum", "sgd", "adam", "adamw"])
def test_optimizer_state_carries_over_both_ways(make):
    """Three steps in minideeplab, two in torch from the mapped state, the state mapped back, two more in
    minideeplab: the same as five steps in minideeplab (float64, the same gradients)."""
    rng = np.random.default_rng(2)
    shapes = [(3, 2), (4,), (2, 2, 3)]
    grads = [[rng.standard_normal(s) for s in shapes] for _ in range(7)]
    start = [rng.standard_normal(s) for s in shapes]

    def ours_steps(opt, params, gs):
        for g in gs:
            for p, gi in zip(params, g):
                p.grad = gi.copy()
            opt.step()

    ref = [Parameter(a.copy()) for a in start]
    ref_opt = make(ref)
    ours_steps(ref_opt, ref, grads)

    params = [Parameter(a.copy()) for a in start]
    opt = make(params)
    ours_steps(opt, params, grads[:3])
    tparams = [torch.nn.Parameter(torch.from_numpy(p.data.copy())) for p in params]
    topt = torch_optimizer(tparams, opt.state_dict())
    for g in grads[3:5]:
        for p, gi in zip(tparams, g):
            p.grad = torch.from_numpy(gi.copy())
        topt.step()
        topt.minideeplab.steps += 1
    back = optimizer_state_back(topt, tparams, lr=opt.lr)
    resumed = [Parameter(p.detach().numpy().copy()) for p in tparams]
    opt2 = make(resumed)
    opt2.load_state_dict(back)
    ours_steps(opt2, resumed, grads[5:])
    for a, b in zip(resumed, ref):
        np.testing.assert_allclose(a.data, b.data, rtol=1e-12, atol=1e-14)
    assert opt2.state_dict().keys() == ref_opt.state_dict().keys()
    for k, v in ref_opt.state_dict().items():
        np.testing.assert_allclose(opt2.state_dict()[k], v, rtol=1e-12, atol=1e-14, err_msg=k) \
            if np.asarray(v).dtype.kind == "f" else np.testing.assert_array_equal(opt2.state_dict()[k], v, err_msg=k)


@pytest.mark.parametrize("name", ["poly", "cosine", "constant"])
def test_schedule_restored_at_its_position(name):
    holder = AdamW([Parameter(np.zeros(2))], lr=0.01)
    schedule = build_scheduler(name, holder, total_steps=20, warmup_steps=3)
    for _ in range(7):
        schedule.step()
    restored = restore_schedule(schedule.state_dict())
    for _ in range(15):
        assert restored.optimizer.lr == schedule.optimizer.lr
        schedule.step()
        restored.step()


def test_host_dropout_draws_our_masks():
    from minideeplab.nn import Dropout

    x = np.random.default_rng(3).standard_normal((2, 5, 4, 4)).astype(np.float32)
    ours, theirs = Dropout(0.3, rng=np.random.default_rng(9)), HostDropout(0.3, np.random.default_rng(9))
    for _ in range(2):
        np.testing.assert_array_equal(theirs(torch.from_numpy(x)).numpy(), ours(x))
    np.testing.assert_array_equal(theirs.eval()(torch.from_numpy(x)).numpy(), x)
    assert ours.rng.random() == theirs.rng.random()       # the same number of draws: the streams stay in step


# -- whole runs ---------------------------------------------------------------------------------------------------
def _stop_at(trainer, step):
    trainer.on_step_end = lambda t: t.request_stop() if t.global_step == step else None
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()


def test_one_process_continues_the_run_as_the_trainer_does(tmp_path):
    """From a mid-epoch checkpoint (step 3), two more steps, across an epoch end (validation, best.npz) and into
    the next epoch: minideeplab's Trainer and one PyTorch process (augmentation and dropout on) give the same
    checkpoint: weights and AdamW moments to float32 rounding, everything else exactly."""
    cfg = TrainConfig(model="small", image_size=32, batch_size=4, train_size=8, val_size=4, epochs=4, lr=3e-3,
                      warmup_steps=2, seed=3)
    _stop_at(Trainer(cfg, out_dir=tmp_path / "run", progress=False, figures=False), 3)
    start = tmp_path / "start.npz"
    shutil.copy(tmp_path / "run" / "last.npz", start)
    # a new folder: the best of epoch 1 cannot be rebuilt from a checkpoint of epoch 2, and the trainer says so
    with pytest.warns(RuntimeWarning, match="missing or stale"):
        _stop_at(Trainer.from_checkpoint(start, out_dir=tmp_path / "ours", progress=False, figures=False), 5)
    summary = launch(start, 1, out=tmp_path / "torch", steps=2, log=None)
    assert summary["steps"] == 2 and summary["global_step"] == 5

    ours, theirs, before = (load_checkpoint(tmp_path / d / "last.npz") for d in ("ours", "torch", "run"))
    params = [k for k in ours.model_state if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    moved = max(np.abs(ours.model_state[k] - before.model_state[k]).max() for k in params)
    diff = max(np.abs(ours.model_state[k] - theirs.model_state[k]).max() for k in params)
    assert diff < 2e-5 and diff < 0.01 * moved, (diff, moved)        # measured: 6.0e-6 vs 4.6e-3
    for k in set(ours.model_state) - set(params):                     # batch-norm statistics: measured 4.8e-7
        np.testing.assert_allclose(theirs.model_state[k], ours.model_state[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert ours.optimizer_state.keys() == theirs.optimizer_state.keys()
    for k, v in ours.optimizer_state.items():
        if k.startswith("state."):
            np.testing.assert_allclose(theirs.optimizer_state[k], v, rtol=0, atol=1e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(theirs.optimizer_state[k], v, err_msg=k)
    for k, v in ours.scheduler_state.items():
        np.testing.assert_array_equal(theirs.scheduler_state[k], v, err_msg=k)
    for k in ("epoch", "step_in_epoch", "global_step", "rng", "best_iou", "train_config"):
        assert theirs.meta[k] == ours.meta[k], k
    np.testing.assert_array_equal(theirs.extra["epoch_order"], ours.extra["epoch_order"])
    assert len(theirs.meta["history"]) == len(ours.meta["history"]) == 2
    for mine, other in zip(ours.meta["history"], theirs.meta["history"]):     # the epoch-2 row: validated by each
        assert other.keys() == mine.keys()
        assert {k: v for k, v in other.items() if k != "seconds"} == pytest.approx(
            {k: v for k, v in mine.items() if k != "seconds"}, rel=1e-5)
    assert (tmp_path / "torch" / "best.npz").exists() == (tmp_path / "ours" / "best.npz").exists()
    # and minideeplab picks the run up again from PyTorch's checkpoint
    again = Trainer.from_checkpoint(tmp_path / "torch" / "last.npz", progress=False, figures=False)
    assert (again.epoch, again.step_in_epoch, again.global_step) == (2, 1, 5)


def test_two_processes_keep_equal_weights_and_lower_the_loss(tmp_path):
    """Two CPU processes (gloo) continue a run on a fixed batch of 4 images (2 per process) for 12 steps: the
    processes' parameters are equal after the steps, the loss falls, and the checkpoint rank 0 wrote loads in
    minideeplab, whose own evaluation gives the validation scores PyTorch reported."""
    cfg = TrainConfig(model="small", image_size=32, batch_size=4, train_size=4, val_size=4, epochs=40, lr=3e-3,
                      warmup_steps=1, seed=0, augment=False)
    _stop_at(Trainer(cfg, out_dir=tmp_path / "run", progress=False, figures=False), 1)
    summary = launch(tmp_path / "run" / "last.npz", 2, out=tmp_path / "torch", steps=12, log=None,
                     replica_dir=tmp_path / "replicas")
    losses = summary["losses"]
    assert summary["world_size"] == 2 and len(losses) == 12 and summary["global_step"] == 13
    # measured: 1.28, 1.23, 1.10 ... 0.95, 0.94, 0.94 (deterministic: fixed data, weights and order)
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3]), losses

    with np.load(tmp_path / "replicas" / "replica0.npz") as a, np.load(tmp_path / "replicas" / "replica1.npz") as b:
        params = [k for k in a.files if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        assert max(np.abs(a[k] - b[k]).max() for k in params) == 0.0
    assert summary["replica_max_abs_diff"] == 0.0

    ckpt = load_checkpoint(tmp_path / "torch" / "last.npz")
    assert ckpt.meta["torch_ddp"]["world_size"] == 2 and ckpt.meta["global_step"] == 13
    with np.load(tmp_path / "replicas" / "replica0.npz") as a:       # rank 0's weights went into the file
        for k in a.files:
            np.testing.assert_array_equal(ckpt.model_state[k], a[k], err_msg=k)
    model, _ = load_model(tmp_path / "torch" / "last.npz")
    trainer = Trainer(TrainConfig.from_dict(ckpt.meta["train_config"]), progress=False, figures=False)
    ours = evaluate(model, trainer.val_loader, trainer.loss_fn, cfg.threshold)
    row = ckpt.meta["history"][-1]
    assert row["step"] == 13
    assert ours["loss"] == pytest.approx(row["val_loss"], rel=1e-4)
    assert ours["iou"] == pytest.approx(row["val_iou"], abs=1e-3)

    from minideeplab.cli import main
    assert main(["evaluate", str(tmp_path / "torch" / "last.npz")]) == 0


def test_command_line_refuses_what_it_cannot_continue(tmp_path, capsys):
    """Wrong inputs give one line and exit 2, before any process starts."""
    from minideeplab import io
    from minideeplab.models import DeepLabConfig, build_deeplab
    from minideeplab.torch_ddp import main

    cfg = TrainConfig(model="small", image_size=32, batch_size=4, train_size=4, val_size=4, epochs=1, seed=0)
    trainer = Trainer(cfg, out_dir=tmp_path / "run", progress=False, figures=False)
    trainer.save(tmp_path / "start.npz")                                   # step 0 of a 1-epoch run
    io.save(build_deeplab(DeepLabConfig.small()), tmp_path / "weights.npz")
    cases = [(["weights.npz"], r"weights\.npz' is not a minideeplab training checkpoint"),
             (["missing.npz"], r"no such checkpoint file"),
             (["start.npz", "--nproc", "3"], r"batch of 4 images does not split into 3 processes of at least 2 "
                                             r"images each .* process counts that fit: \[1, 2\]"),
             (["start.npz", "--nproc", "0"], r"nproc must be >= 1")]
    for argv, message in cases:
        assert main([str(tmp_path / argv[0]), *argv[1:]]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err), (argv, err)
    trainer.fit()                                                          # the run's one epoch is done
    assert main([str(tmp_path / "run" / "last.npz")]) == 2
    assert "the run is complete (1 of 1 epochs)" in capsys.readouterr().err
