"""Trainer: learning happens, checkpoints hold everything, resume is bit-identical, Ctrl-C saves."""
import csv
import signal

import numpy as np
import pytest

from minideeplab import io
from minideeplab.checkpoint import CHECKPOINT_KIND, load_checkpoint, load_model
from minideeplab.train import TrainConfig, Trainer

TINY = {"model": "small", "image_size": 32, "batch_size": 4, "train_size": 12, "val_size": 4, "epochs": 2,
        "lr": 3e-3, "warmup_steps": 2, "seed": 3}


def _weights(trainer):
    state = {f"model.{k}": np.array(v) for k, v in trainer.model.state_dict().items()}
    state.update({f"optim.{k}": np.array(v) for k, v in trainer.optimizer.state_dict().items()})
    return state


def _assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, f"differ after resume: {different[:5]}"


@pytest.mark.slow
def test_short_training_lowers_loss_and_raises_iou():
    """Small model, 48 px, 30 steps: the loss falls and the validation IoU climbs clearly above the score of
    predicting every pixel as foreground (the validation foreground share)."""
    cfg = TrainConfig(model="small", output_stride=8, image_size=48, batch_size=8, train_size=80, val_size=16,
                      epochs=3, lr=5e-3, warmup_steps=3, augment=False, seed=0)
    trainer = Trainer(cfg, progress=False, figures=False)
    history = trainer.fit()
    val_fg = np.mean([trainer.val_set[i][1].mean() for i in range(len(trainer.val_set))])
    assert history[-1]["train_loss"] < 0.85 * history[0]["train_loss"], history
    assert history[-1]["val_loss"] < history[0]["val_loss"], history
    assert history[-1]["val_iou"] > val_fg + 0.1, (history, val_fg)


def test_run_folder_contents_and_checkpoint(tmp_path):
    trainer = Trainer(TrainConfig(**TINY), out_dir=tmp_path, progress=False)
    trainer.fit()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best.npz", "curves.png", "history.csv", "last.npz", "predictions.png"]
    with open(tmp_path / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and int(rows[-1]["step"]) == trainer.global_step == 6
    # the last validation (printed by the CLI and the demo) is the last history row's, counts included
    assert float(rows[-1]["val_iou"]) == pytest.approx(trainer.last_val["iou"], rel=1e-12)
    assert sum(trainer.last_val[k] for k in ("tp", "fp", "fn", "tn")) == 4 * 32 * 32
    ckpt = load_checkpoint(tmp_path / "last.npz")
    meta = ckpt.meta
    assert meta["kind"] == CHECKPOINT_KIND and meta["epoch"] == 2 and meta["global_step"] == 6
    assert set(meta["rng"]) == {"shuffle", "augment", "dropout"}
    assert TrainConfig.from_dict(meta["train_config"]) == trainer.cfg
    assert meta["model_config"]["growth_rate"] == 8
    for k, v in trainer.model.state_dict().items():
        np.testing.assert_array_equal(ckpt.model_state[k], v)
    assert int(ckpt.optimizer_state["steps"]) == 6 and int(ckpt.scheduler_state["last_step"]) == 6
    model, _ = load_model(tmp_path / "best.npz")
    assert not model.training
    # the weights-only loader reads training checkpoints too (one loader, two entry points)
    plain = io.load_model(tmp_path / "last.npz")
    for k, v in trainer.model.state_dict().items():
        np.testing.assert_array_equal(plain.state_dict()[k], v)


def _uninterrupted():
    trainer = Trainer(TrainConfig(**TINY), progress=False, figures=False)
    trainer.fit()
    return _weights(trainer), trainer.history


def _resume_and_finish(path, out_dir=None):
    resumed = Trainer.from_checkpoint(path, out_dir=out_dir, progress=False, figures=False)
    resumed.fit()
    return _weights(resumed), resumed.history


def _interrupt_then_resume(trainer, counters):
    """``trainer.fit()`` must raise KeyboardInterrupt after saving ``last.npz`` at ``counters`` = (epoch,
    step_in_epoch, global_step); returns that checkpoint's meta and (weights, history) of the run resumed from it."""
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    meta = load_checkpoint(trainer.out_dir / "last.npz").meta
    assert (meta["epoch"], meta["step_in_epoch"], meta["global_step"]) == counters
    return meta, _resume_and_finish(trainer.out_dir / "last.npz")


def test_resume_after_stop_is_bit_identical(tmp_path):
    reference, ref_history = _uninterrupted()
    trainer = Trainer(TrainConfig(**TINY), out_dir=tmp_path, progress=False, figures=False)
    trainer.on_step_end = lambda t: t.request_stop() if t.global_step == 2 else None   # mid-epoch 1
    _, (weights, history) = _interrupt_then_resume(trainer, (0, 2, 2))
    _assert_bit_identical(reference, weights)
    # the running loss and confusion counts of the interrupted epoch were checkpointed too
    assert [(r["train_loss"], r["train_iou"]) for r in history] == [(r["train_loss"], r["train_iou"])
                                                                    for r in ref_history]


def test_ctrl_c_inside_a_step_saves_the_clean_state(tmp_path):
    """A KeyboardInterrupt in the middle of a forward pass (after batch norm updated its statistics and the
    augmentation Generator moved on) rolls back to the start of the step, saves, and resumes bit-identically."""
    reference, _ = _uninterrupted()
    trainer = Trainer(TrainConfig(**TINY), out_dir=tmp_path, progress=False, figures=False)
    head, calls = trainer.model.head, {"n": 0}
    original = head.forward

    def forward(x):
        calls["n"] += trainer.model.training    # training forwards only (validation may split its batch over threads)
        if calls["n"] == 5:     # 3 steps of epoch 1, 1 step: the 2nd step of epoch 2, after the backbone
            raise KeyboardInterrupt
        return original(x)
    head.forward = forward
    _, (weights, _) = _interrupt_then_resume(trainer, (1, 1, 4))
    _assert_bit_identical(reference, weights)


def test_sigint_stops_after_the_step_and_saves(tmp_path):
    """A real SIGINT after the last step of epoch 1: saved before validation, resumes bit-identically."""
    reference, _ = _uninterrupted()
    trainer = Trainer(TrainConfig(**TINY), out_dir=tmp_path, progress=False, figures=False)
    trainer.on_step_end = lambda t: signal.raise_signal(signal.SIGINT) if t.global_step == 3 else None
    meta, (weights, _) = _interrupt_then_resume(trainer, (0, 3, 3))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler    # handler restored
    assert meta["history"] == []
    _assert_bit_identical(reference, weights)


def test_resume_from_epoch_end_checkpoint(tmp_path):
    reference, _ = _uninterrupted()
    trainer = Trainer(TrainConfig(**TINY), out_dir=tmp_path, progress=False, figures=False)
    saved = tmp_path / "epoch1.npz"
    trainer.on_step_end = (lambda t: saved.write_bytes((tmp_path / "last.npz").read_bytes())
                           if t.global_step == 4 else None)      # last.npz is then the end-of-epoch-1 save
    trainer.fit()
    _assert_bit_identical(reference, _weights(trainer))
    assert load_checkpoint(saved).meta["epoch"] == 1
    # resuming it in its own folder would replace the finished run's later last.npz: refused, so another folder
    weights, _ = _resume_and_finish(saved, tmp_path / "again")
    _assert_bit_identical(reference, weights)


@pytest.mark.parametrize("field, value, message", [
    ("model", "resnet", "model must be one of"), ("output_stride", 12, "output_stride must be 8, 16 or 32"),
    ("batch_size", 1, "batch_size must be >= 2"), ("loss", "l2", "unknown loss"), ("lr", 0.0, "lr must be > 0"),
])
def test_invalid_config(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value}).validate()


def test_training_set_smaller_than_a_batch():
    with pytest.raises(ValueError, match="fewer than one batch"):
        Trainer(TrainConfig(**{**TINY, "train_size": 3}), progress=False)


def test_demo_runs_end_to_end_on_a_tiny_config(tmp_path, monkeypatch, capsys):
    """`make demo` is a 9-minute job no test can afford; the same code path on a tiny config guards its wiring."""
    from minideeplab import demo

    monkeypatch.setattr(demo, "DEMO_CONFIG", TrainConfig(**TINY))
    assert demo.main(["--out", str(tmp_path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "iou" in printed and "target validation IoU >= 0.85" in printed
    assert (tmp_path / "best.npz").exists() and (tmp_path / "curves.png").exists()
