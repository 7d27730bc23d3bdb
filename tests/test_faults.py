"""Fault injection: a tiny run (small model, 16 px, 2 steps per epoch, 2 epochs) is interrupted, signalled, starved
of disk or made to diverge at many points; after each case the run folder must hold what the docs promise.

The invariant (``_check_folder``): ``last.npz`` loads and holds only finite values; ``best.npz`` exists exactly when
``last.npz`` records a best epoch and is that epoch's checkpoint of the same run (after a crash between the two
writes it may be the next epoch's, which the resumed run writes again identically); no temporary file and no lock
is left; and the run resumed from ``last.npz`` ends bit-identical to an uninterrupted one (``_resume_matches``).

Injection: ``os.replace`` / ``os.fsync`` are wrapped so that, at the chosen write of the chosen file, a signal is
raised (``signal.raise_signal``, which runs the trainer's handler as a real signal would), an exception stands for a
crash, or an ``OSError`` for a full disk or a read-only file system. A few cases run the CLI in a subprocess and
send it real signals (``kill -INT/-TERM/-9``) or close its stdout.

Speed (the suite runs in ``make test``): ``os.fsync`` is a no-op except in the cases that inject at it; the
uninterrupted run and a finished run folder are trained once per module (fixtures ``reference``, ``finished``); a
best.npz already checked is not read again while it is unchanged; the subprocesses are signalled mid-epoch, before
they ever import Matplotlib.
"""
import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from minideeplab import io
from minideeplab.checkpoint import load_checkpoint
from minideeplab.cli import main
from minideeplab.finite import NonFiniteError, TrainingDiverged, unhealthy_arrays
from minideeplab.runfolder import Interrupted, RunFolder, RunFolderError, new_run_dir
from minideeplab.train import TrainConfig, Trainer

TINY = {"model": "small", "image_size": 16, "batch_size": 2, "train_size": 4, "val_size": 2, "epochs": 2,
        "lr": 3e-3, "warmup_steps": 1, "seed": 3}
ROOT = Path(__file__).resolve().parents[1]
REAL_FSYNC = os.fsync


@pytest.fixture(autouse=True)
def _fsync_is_a_no_op():
    """No case but those injecting at an fsync (``Inject``, moment "during", which calls the real one) tests
    durability, and a real fsync costs milliseconds to seconds on a busy disk: elsewhere ``os.fsync`` does nothing.
    Its own MonkeyPatch, set up before the test's (autouse), so that a test's ``monkeypatch.undo()`` keeps it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fsync", lambda fd: None)
        yield


def _trainer(folder, figures=False, **kwargs):
    return Trainer(TrainConfig(**TINY), out_dir=folder, progress=False, figures=figures, **kwargs)


def _weights(trainer):
    state = {f"model.{k}": np.array(v) for k, v in trainer.model.state_dict().items()}
    state.update({f"optim.{k}": np.array(v) for k, v in trainer.optimizer.state_dict().items()})
    return state


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted run: final weights and optimizer state, best epoch and IoU."""
    trainer = Trainer(TrainConfig(**TINY), progress=False, figures=False)
    trainer.fit()
    return _weights(trainer), trainer.best_epoch, trainer.best_iou


def _check_folder(folder, best_may_be_newer=False, lock_may_remain=False, killed=False):
    """The invariant above; returns last.npz as loaded (``checkpoint.Checkpoint``; None when the run died before its
    first save). ``killed``: after kill -9, temporary files and the lock file may remain (the next run removes them)
    and best.npz may be newer."""
    names = os.listdir(folder)
    assert killed or not [n for n in names if n.startswith(".tmp-")], names
    assert killed or lock_may_remain or ".lock" not in names, names
    best_may_be_newer = best_may_be_newer or killed
    if "last.npz" not in names:
        assert not {"best.npz", "history.csv"} & set(names), names
        return None
    last = load_checkpoint(folder / "last.npz")
    assert not unhealthy_arrays([*last.model_state.items(), *last.optimizer_state.items()])
    meta = last.meta
    if not (folder / "best.npz").exists():
        assert meta["best_epoch"] is None, meta["best_epoch"]
        return last
    best = _finite_best_meta(folder / "best.npz")
    assert best["run_id"] == meta["run_id"]
    if best_may_be_newer and (meta["best_epoch"] is None or best["epoch"] > meta["best_epoch"]):
        assert best["epoch"] == meta["epoch"] + 1      # written just before the last.npz that did not follow
    else:
        assert (best["epoch"], best["best_iou"]) == (meta["best_epoch"], meta["best_iou"])
        assert best["step_in_epoch"] == 0 and best["best_epoch"] == meta["best_epoch"]
    return last


_FINITE_BEST = {}     # (path, inode, size, mtime) of a best.npz found loadable and finite -> its meta


def _finite_best_meta(path):
    """The meta of ``path`` after checking that it loads and holds finite weights. A file already checked (same
    path, inode, size and modification time: a resumed run that did not improve left it as it was) is not read
    again; a rewrite (a new file renamed onto it) changes its inode."""
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _FINITE_BEST:
        best = load_checkpoint(path)
        assert not unhealthy_arrays(best.model_state.items())
        _FINITE_BEST[key] = best.meta
    return _FINITE_BEST[key]


def _resume_matches(folder, reference, last=None):
    """Resume from folder/last.npz, finish, and compare with the uninterrupted run; the folder is then complete.
    ``last``: folder/last.npz as ``_check_folder`` just loaded it (not read a second time)."""
    weights, best_epoch, best_iou = reference
    resumed = Trainer.from_checkpoint(last if last is not None else folder / "last.npz", progress=False,
                                      figures=False)
    resumed.fit()
    final = _weights(resumed)
    different = [k for k in weights if not np.array_equal(weights[k], final[k])]
    assert not different, different[:5]
    meta = _check_folder(folder).meta
    assert (meta["epoch"], meta["best_epoch"], meta["best_iou"]) == (TINY["epochs"], best_epoch, best_iou)


class Inject:
    """Wrap ``os.replace`` and ``os.fsync``: at the ``occurrence``-th write of the file named ``target``, call
    ``action`` ``during`` it (at the fsync of its temporary file, fully written), ``before`` its rename or ``after``."""

    def __init__(self, monkeypatch, target, occurrence, moment, action):
        self.target, self.occurrence, self.moment, self.action = target, occurrence, moment, action
        self.seen, self.fired = Counter(), False
        real_replace, real_fsync = os.replace, (REAL_FSYNC if moment == "during" else os.fsync)

        def replace(src, dst, *args, **kwargs):
            hit = os.path.basename(os.fspath(dst)) == target and self._count("replace")
            if hit and moment == "before":
                self._fire()
            real_replace(src, dst, *args, **kwargs)
            if hit and moment == "after":
                self._fire()

        def fsync(fd):
            try:
                name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                name = ""
            real_fsync(fd)
            if moment == "during" and name.startswith(f".tmp-{target}-") and self._count("fsync"):
                self._fire()

        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "fsync", fsync)

    def _count(self, kind) -> bool:
        if kind == ("fsync" if self.moment == "during" else "replace"):
            self.seen[kind] += 1
            return self.seen[kind] == self.occurrence
        return False

    def _fire(self):
        self.fired = True
        self.action()


def _stops(trainer) -> Interrupted:
    """``trainer.fit()``, which must end in ``runfolder.Interrupted``. A bare KeyboardInterrupt (a signal that cut
    short work that cannot be rolled back, e.g. a checkpoint write) fails the case instead of ending the session."""
    try:
        trainer.fit()
    except Interrupted as e:
        return e
    except KeyboardInterrupt as e:
        pytest.fail(f"fit() ended in a bare {type(e).__name__}, not runfolder.Interrupted")
    pytest.fail("fit() was not interrupted")


@pytest.fixture(autouse=True)
def _uncaught_sigterm_fails_the_case():
    """A SIGTERM raised in this process that the trainer does not catch would end pytest (its default action):
    here it fails the case instead. The trainer and the CLI put this handler back when they end."""
    def uncaught(signum, frame):
        pytest.fail("SIGTERM reached the test process: the trainer did not handle it")
    previous = signal.signal(signal.SIGTERM, uncaught)
    yield
    signal.signal(signal.SIGTERM, previous)


def _signal(*signums):
    def action():
        for s in signums:
            signal.raise_signal(s)
    return action


def _raise(exc):
    def action():
        raise exc
    return action


pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="the write injection reads /proc/self/fd")

# Writes of a run: last.npz #1 at step 0, then per epoch best.npz (epoch 1 improves on nothing), last.npz, history.csv.
WRITES = [("last.npz", 1), ("best.npz", 1), ("last.npz", 2), ("history.csv", 1)]


@pytest.mark.parametrize("target, occurrence", WRITES, ids=[f"{t}#{n}" for t, n in WRITES])
@pytest.mark.parametrize("moment", ["during", "after"])
def test_crash_at_a_write(tmp_path, monkeypatch, reference, target, occurrence, moment):
    """crash-<moment>-<file>#<n>: the process dies (an exception no handler catches, like kill -9 but letting
    atomic_write remove its temporary file) while a checkpoint/history write is in progress (its temporary file
    fully written, not yet renamed) or just after its rename: the folder holds the last complete state (best.npz at
    most one epoch ahead) and resuming ends bit-identical; a run that died before its first save leaves a folder a
    new run accepts. (A kill -9 that leaves the temporary file behind: test_real_signal_to_the_cli.)"""
    inject = Inject(monkeypatch, target, occurrence, moment, _raise(SystemExit("crash")))
    with pytest.raises(SystemExit):
        _trainer(tmp_path).fit()
    assert inject.fired
    monkeypatch.undo()
    last = _check_folder(tmp_path, best_may_be_newer=True)
    if last is None:
        _trainer(tmp_path).fit()                 # nothing was saved: the folder is free for a new run
        _check_folder(tmp_path)
    else:
        _resume_matches(tmp_path, reference, last)


INT, TERM = signal.SIGINT, signal.SIGTERM
SIGNALLED_WRITES = [(f"{name}-{t}#{n}", t, n, sigs, code)
                    for name, sigs, code in [("sigint", (INT,), 130), ("sigint-twice", (INT, INT), 130)]
                    for t, n in WRITES] + [
    ("sigterm-best.npz#1", "best.npz", 1, (TERM,), 143), ("sigterm-last.npz#2", "last.npz", 2, (TERM,), 143),
    ("sigterm-then-sigint-history.csv#1", "history.csv", 1, (TERM, INT), 143)]


@pytest.mark.parametrize("target, occurrence, signals, code", [c[1:] for c in SIGNALLED_WRITES],
                         ids=[c[0] for c in SIGNALLED_WRITES])
def test_signal_during_a_write(tmp_path, monkeypatch, reference, target, occurrence, signals, code):
    """<signals>-<file>#<n>: Ctrl-C, Ctrl-C twice, SIGTERM or SIGTERM then Ctrl-C while a checkpoint or the history
    is being written: the write is never cut short, the run stops at the next safe point with the exit code of the
    first signal, and the folder is complete (best.npz matches exactly); resuming ends bit-identical."""
    inject = Inject(monkeypatch, target, occurrence, "during", _signal(*signals))
    stop = _stops(_trainer(tmp_path))
    assert inject.fired and stop.exit_code == code
    monkeypatch.undo()
    last = _check_folder(tmp_path)
    assert last.meta["epoch"] == (0 if (target, occurrence) == ("last.npz", 1) else 1)
    _resume_matches(tmp_path, reference, last)


def _in_forward(trainer, action, training, call):
    """Run ``action`` in the head's ``call``-th forward of that mode (training or validation)."""
    head, calls = trainer.model.head, Counter()
    original = head.forward

    def forward(x):
        # counted on the main thread only: validation under no_grad may run part of its batch in a worker thread
        # (nn.threads), and signals raised there are handled later by the main thread, two raised back to back as
        # one handler call (CPython keeps one pending flag per signal), which a user's two Ctrl-C presses never are
        if threading.current_thread() is threading.main_thread():
            calls[head.training] += 1
            if head.training == training and calls[training] == call:
                action()
        return original(x)
    head.forward = forward


# (id, where, signals, expected (epoch, step_in_epoch, global_step) of the saved last.npz)
STEP_CASES = [
    ("sigint-in-forward", "forward", (signal.SIGINT,), (0, 2, 2)),          # step 2 finishes, then stop
    ("sigint-twice-in-forward", "forward", (signal.SIGINT,) * 2, (0, 1, 1)),  # step 2 rolled back to its start
    ("sigterm-in-forward", "forward", (signal.SIGTERM,), (0, 2, 2)),
    ("sigint-twice-in-update", "update", (signal.SIGINT,) * 2, (0, 2, 2)),  # an update is never cut: stop after it
    ("sigint-in-validation", "validation", (signal.SIGINT,), (1, 0, 2)),    # validation finishes, epoch 1 saved
    ("sigint-twice-in-validation", "validation", (signal.SIGINT,) * 2, (0, 2, 2)),  # saved before validation
    ("sigterm-twice-in-validation", "validation", (signal.SIGTERM,) * 2, (0, 2, 2)),
    ("sigint-twice-in-curves", "curves", (signal.SIGINT,) * 2, (1, 0, 2)),  # figure aborted, epoch 1 saved
    ("sigint-twice-in-predictions", "predictions", (signal.SIGINT,) * 2, (2, 0, 4)),  # the run's last figure
]


@pytest.mark.parametrize("where, signals, saved", [c[1:] for c in STEP_CASES], ids=[c[0] for c in STEP_CASES])
def test_signal_inside_the_loop(tmp_path, monkeypatch, reference, where, signals, saved):
    """<signals>-in-<place>: signals in the 2nd step's forward or update, in epoch 1's validation, or while a figure
    is drawn: the run stops where the docs say (first signal: after the step; second: the step, validation or figure
    is abandoned and rolled back), saves exactly that state, and resuming ends bit-identical."""
    trainer = _trainer(tmp_path, figures=where in ("curves", "predictions"))
    action = _signal(*signals)
    if where == "forward":
        _in_forward(trainer, action, training=True, call=2)
    elif where == "validation":
        _in_forward(trainer, action, training=False, call=1)
    elif where == "update":
        step, calls = trainer.optimizer.step, Counter()

        def update():
            calls["n"] += 1
            if calls["n"] == 2:
                action()
            step()
        trainer.optimizer.step = update
    else:
        from minideeplab import plots
        name = "plot_curves" if where == "curves" else "plot_predictions"
        draw = getattr(plots, name)

        def drawing(*args, **kwargs):
            action()
            return draw(*args, **kwargs)
        monkeypatch.setattr(plots, name, drawing)
    stop = _stops(trainer)
    assert stop.exit_code == (143 if signals[0] == signal.SIGTERM else 130)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler      # handlers restored
    monkeypatch.undo()
    last = _check_folder(tmp_path)
    meta = last.meta
    assert (meta["epoch"], meta["step_in_epoch"], meta["global_step"]) == saved
    assert where != "curves" or not (tmp_path / "curves.png").exists()
    if meta["epoch"] < TINY["epochs"]:
        _resume_matches(tmp_path, reference, last)


def test_broken_pipe_in_the_log_stops_after_saving(tmp_path, reference):
    """broken-pipe-log: the log's reader went away (``train | head -1``) when the epoch line is printed: the epoch's
    checkpoints are still written, the run stops with exit code 141, later lines go to stderr."""
    def log(line):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")
    trainer = Trainer(TrainConfig(**TINY), out_dir=tmp_path, progress=False, figures=False, log=log)
    with pytest.raises(Interrupted) as info:
        trainer.fit()
    assert info.value.exit_code == 141 and "broken pipe" in str(info.value)
    last = _check_folder(tmp_path)
    assert (last.meta["epoch"], last.meta["global_step"]) == (1, 2)
    _resume_matches(tmp_path, reference, last)


def test_broken_pipe_under_the_progress_bar(tmp_path, monkeypatch, reference):
    """broken-pipe-bar: stderr (the progress bars) is a closed pipe: the run stops at the first step boundary with
    exit code 141 instead of dying inside tqdm, last.npz saved."""
    class Closed:
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
    monkeypatch.setattr(sys, "stderr", Closed())
    trainer = Trainer(TrainConfig(**TINY), out_dir=tmp_path, progress=True, figures=False)
    with pytest.raises(Interrupted) as info:
        trainer.fit()
    monkeypatch.undo()
    assert info.value.exit_code == 141
    last = _check_folder(tmp_path)
    assert last.meta["global_step"] == 0
    _resume_matches(tmp_path, reference, last)


@pytest.mark.parametrize("target, occurrence, code", [("best.npz", 1, errno.ENOSPC), ("last.npz", 2, errno.ENOSPC),
                                                      ("last.npz", 1, errno.ENOSPC), ("last.npz", 2, errno.EROFS)],
                         ids=["enospc-best", "enospc-last", "enospc-first-last", "erofs-last"])
def test_checkpoint_write_fails(tmp_path, monkeypatch, reference, target, occurrence, code):
    """<errno>-<file>: a full disk (or a file system turned read-only) while a checkpoint is written: the run stops
    with an OSError naming the checkpoint (not its temporary file), the folder keeps the last complete state."""
    inject = Inject(monkeypatch, target, occurrence, "during", _raise(OSError(code, os.strerror(code))))
    with pytest.raises(OSError) as info:
        _trainer(tmp_path).fit()
    assert inject.fired and info.value.errno == code
    assert f"cannot write {str(tmp_path / target)!r}" in str(info.value) and ".tmp-" not in str(info.value)
    monkeypatch.undo()
    last = _check_folder(tmp_path, best_may_be_newer=True)
    if last is not None:
        _resume_matches(tmp_path, reference, last)


@pytest.mark.parametrize("target", ["history.csv", "curves.png", "predictions.png"])
def test_side_file_write_fails_with_a_warning(tmp_path, monkeypatch, target):
    """enospc-<file>: the history or a figure cannot be written (full disk): a warning naming the file, and the
    run goes on to the end with its checkpoints."""
    Inject(monkeypatch, target, 1, "during", _raise(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    lines = []         # (figures only where the file is one: drawing them costs more than the rest of the run)
    trainer = Trainer(TrainConfig(**TINY), out_dir=tmp_path, progress=False, figures=target != "history.csv",
                      log=lines.append)
    trainer.fit()
    monkeypatch.undo()
    assert any(line.startswith("warning:") and target in line for line in lines), lines
    assert _check_folder(tmp_path).meta["epoch"] == TINY["epochs"]


def _make_unwritable(monkeypatch, folder):
    """chmod 555, or (root ignores permissions) make creating a file in ``folder`` fail as it would."""
    folder.mkdir(exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    import tempfile
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == folder.resolve():
            raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, ".tmp-x"))
        return real(*args, dir=dir, **kwargs)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_read_only_folder_is_found_before_the_first_step(tmp_path, monkeypatch, capsys):
    """read-only-out: an --out that cannot be written fails before the first step (Trainer.fit and the CLI), with a
    one-line message naming the folder."""
    folder = tmp_path / "ro"
    _make_unwritable(monkeypatch, folder)
    try:
        trainer = _trainer(folder)
        trainer.on_step_end = lambda t: pytest.fail("a step ran")
        with pytest.raises(OSError, match=f"run folder {str(folder)!r} cannot be written"):
            trainer.fit()
        assert main(["train", "--model", "small", "--image-size", "16", "--epochs", "1", "--batch-size", "2",
                     "--train-size", "4", "--val-size", "2", "--quiet", "--out", str(folder)]) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"run folder {str(folder)!r} cannot be written" in err
    finally:
        folder.chmod(0o755)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run folder at the end of an uninterrupted run (as ``_trainer`` makes it), trained once for the module; and
    its last.npz as it was after step 1 (step 0's) and after step 3 (epoch 1's, which records best epoch 1)."""
    run = tmp_path_factory.mktemp("finished")
    trainer = _trainer(run)
    saved = {}
    trainer.on_step_end = lambda t: saved.setdefault(t.global_step, (run / "last.npz").read_bytes())
    trainer.fit()
    return run, saved[1], saved[3]


def _finished_run(folder, finished):
    """``folder`` (created) holds a copy of the finished run's files."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in finished[0].iterdir():
        shutil.copyfile(p, folder / p.name)


def test_folder_of_another_run_is_refused(tmp_path, capsys, finished):
    """existing-run: a new run on the folder of a finished run is refused (API and CLI, one line naming the folder
    and the ways out) and leaves its files untouched; --overwrite replaces it."""
    _finished_run(tmp_path, finished)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RunFolderError, match="holds another run"):
        _trainer(tmp_path).fit()
    argv = ["train", "--model", "small", "--image-size", "16", "--epochs", "1", "--batch-size", "2", "--train-size",
            "4", "--val-size", "2", "--quiet", "--out", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert str(tmp_path) in err and "--resume" in err and "--overwrite" in err and err.count("\n") == 0
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    old_run = io.read_meta(tmp_path / "last.npz")["run_id"]
    assert main([*argv, "--overwrite"]) == 0
    meta = _check_folder(tmp_path).meta
    assert meta["epoch"] == 1 and meta["run_id"] != old_run


def test_resuming_an_older_checkpoint_into_its_folder_is_refused(tmp_path, finished):
    """resume-backwards: resuming best.npz (epoch 1) into the folder whose last.npz is at epoch 2 would move the run
    backwards: refused unless --overwrite; resuming into another folder is fine."""
    _finished_run(tmp_path, finished)
    with pytest.raises(RunFolderError, match="later state of this run"):
        Trainer.from_checkpoint(tmp_path / "best.npz", progress=False, figures=False).fit()
    other = Trainer.from_checkpoint(tmp_path / "best.npz", out_dir=tmp_path / "again", progress=False, figures=False)
    other.fit()
    assert _check_folder(tmp_path / "again").meta["epoch"] == TINY["epochs"]


def test_a_locked_folder_is_refused(tmp_path, capsys):
    """two-runs-one-folder: while a run holds the folder's lock, a second run there is refused, naming the folder
    and the process; after it ends the folder is free."""
    holder = RunFolder(tmp_path)
    holder.open("someone-else", 0)
    try:
        with pytest.raises(RunFolderError, match=f"in use by another run \\(process {os.getpid()}\\)"):
            _trainer(tmp_path).fit()
        assert main(["train", "--model", "small", "--image-size", "16", "--epochs", "1", "--batch-size", "2",
                     "--quiet", "--out", str(tmp_path)]) == 1
        assert f"{str(tmp_path)!r} is in use by another run" in capsys.readouterr().err
    finally:
        holder.close()
    _trainer(tmp_path).fit()
    _check_folder(tmp_path)


def test_leftover_temporary_files_are_removed(tmp_path, reference):
    """leftover-temp-files: temporary files of killed writes (``.tmp-*``) in a run folder are removed when a run
    starts there (it holds the lock, so no live run is writing them); a folder holding only such files is free."""
    trainer = _trainer(tmp_path)
    trainer.on_step_end = lambda t: t.request_stop() if t.global_step == 3 else None
    with pytest.raises(Interrupted):
        trainer.fit()
    for name in (".tmp-last.npz-abc123", ".tmp-best.npz-x", ".tmp-curves.png-y"):
        (tmp_path / name).write_bytes(b"\0" * 100_000)
    _resume_matches(tmp_path, reference)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".tmp-last.npz-zz").write_bytes(b"partial")
    _trainer(fresh).fit()
    _check_folder(fresh)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_outputs_follow_the_umask(tmp_path, umask, mode):
    """umask-<mask>: every file of the run folder gets 0666 & ~umask (mkstemp alone gives 0600)."""
    old = os.umask(umask)
    try:
        Trainer(TrainConfig(**{**TINY, "epochs": 1}), out_dir=tmp_path, progress=False, figures=True).fit()
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert set(modes) == {"last.npz", "best.npz", "history.csv", "curves.png", "predictions.png"}
    assert set(modes.values()) == {mode}, modes


def test_default_run_folders_are_unique(tmp_path):
    """unique-run-dirs: 16 runs starting in the same instant each get their own runs/<date-time> folder."""
    got, barrier = [], threading.Barrier(16)

    def make():
        barrier.wait()
        got.append(new_run_dir(tmp_path / "runs"))
    threads = [threading.Thread(target=make) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 16 and all(p.is_dir() for p in got)


@pytest.mark.parametrize("best", ["missing", "stale"])
def test_missing_or_stale_best_is_rewritten_on_resume(tmp_path, reference, finished, best):
    """best-<missing|stale>-on-resume: a folder whose last.npz records best epoch 1 but whose best.npz is missing or
    older (what the earlier write order left after a kill): resuming writes it before training, and it matches."""
    _, step0, epoch1 = finished
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "last.npz").write_bytes(epoch1)
    if best == "stale":
        (folder / "best.npz").write_bytes(step0)
    trainer = Trainer.from_checkpoint(folder / "last.npz", progress=False, figures=False)
    trainer.on_step_end = lambda t: _check_folder(folder, lock_may_remain=True)   # already right at step 3
    trainer.fit()
    _resume_matches(folder, reference, _check_folder(folder))


def test_resume_into_a_new_folder_gets_the_best_checkpoint(tmp_path, capsys):
    """resume-out-new: ``--resume RUN/last.npz --out NEW`` copies the run's best.npz into NEW (and says only files
    that exist)."""
    run = tmp_path / "run"
    trainer = _trainer(run)
    trainer.on_step_end = lambda t: t.request_stop() if t.global_step == 3 else None
    with pytest.raises(Interrupted):
        trainer.fit()
    new = tmp_path / "new"
    assert main(["train", "--resume", str(run / "last.npz"), "--out", str(new), "--quiet"]) == 0
    assert _check_folder(new).meta["epoch"] == TINY["epochs"]
    claimed = capsys.readouterr().out.strip().splitlines()[-1]
    assert claimed.startswith(f"run folder {new}: ")
    assert all((new / name).exists() for name in claimed.split(": ", 1)[1].split(", "))


def _nan_after_update(trainer, step):
    update, calls = trainer.optimizer.step, Counter()

    def poisoned():
        update()
        calls["n"] += 1
        if calls["n"] == step:
            trainer.model.backbone.features.conv0.weight.data[0] = np.nan    # as an Inf gradient would leave it
    trainer.optimizer.step = poisoned


def test_divergence_nan_weights(tmp_path, reference):
    """diverge-nan-weights: the update of step 3 leaves NaN weights; step 4's forward finds non-finite batch
    statistics: the run stops naming step 4 / epoch 2 and suggesting a lower learning rate; last.npz keeps the last
    finite state (epoch 1's), best.npz is finite; resuming from it ends bit-identical."""
    trainer = _trainer(tmp_path)
    _nan_after_update(trainer, 3)
    with pytest.raises(TrainingDiverged, match=r"at step 4 \(epoch 2\): the batch statistics of "
                       r"backbone.features.norm0 are not finite.*lower the learning rate"):
        trainer.fit()
    last = _check_folder(tmp_path)
    assert last.meta["global_step"] == 2
    _resume_matches(tmp_path, reference, last)


@pytest.mark.parametrize("poison", ["weight-1e13", "running-var-inf", "val-loss-nan"])
def test_divergence_found_at_the_epoch_end(tmp_path, monkeypatch, poison):
    """diverge-<poison>: after epoch 2's training a weight is finite but 1e13, a running variance is Inf, or the
    validation loss is NaN: the epoch-end check stops the run before anything of epoch 2 is written (no best.npz
    from a diverged epoch), last.npz keeps epoch 1."""
    trainer = _trainer(tmp_path)

    def poisoned(t):
        if t.global_step == 4 and poison == "weight-1e13":
            t.model.backbone.features.conv0.weight.data[0, 0, 0, 0] = 1e13
        elif t.global_step == 4 and poison == "running-var-inf":
            t.model.backbone.features.norm0.running_var[0] = np.inf
    trainer.on_step_end = poisoned
    if poison == "val-loss-nan":
        from minideeplab import train
        real = train.evaluate

        def evaluate(*args, **kwargs):
            out = real(*args, **kwargs)
            return {**out, "loss": float("nan")} if trainer.epoch == 1 else out
        monkeypatch.setattr(train, "evaluate", evaluate)
    with pytest.raises(TrainingDiverged, match="after epoch 2.*lower the learning rate") as info:
        trainer.fit()
    assert {"weight-1e13": "reaches 1e+13", "running-var-inf": "norm0.running_var is not finite",
            "val-loss-nan": "validation loss is nan"}[poison] in str(info.value)
    meta = _check_folder(tmp_path).meta
    assert (meta["epoch"], meta["global_step"], meta["best_epoch"]) == (1, 2, 1)


def test_divergence_exploding_loss_cli(tmp_path, capsys):
    """diverge-lr-1000: Adam at --lr 1000: the loss explodes; the CLI prints one line naming the step and the
    learning rate and exits with 3; last.npz is finite and loads, no best.npz of a diverged epoch."""
    code = main(["train", "--model", "small", "--image-size", "16", "--epochs", "2", "--batch-size", "2",
                 "--train-size", "8", "--val-size", "2", "--quiet", "--optimizer", "adam", "--lr", "1000",
                 "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 3 and err.count("\n") == 0 and "training diverged at step" in err and "--lr" in err, err
    _check_folder(tmp_path)


def test_batch_norm_refuses_a_non_finite_batch():
    """bn-nan-input: one NaN pixel in a training forward raises a ValueError naming the layer before any running
    statistic changes (the whole model: the first batch norm stops it)."""
    from minideeplab.models import DeepLabConfig, build_deeplab
    from minideeplab.nn import BatchNorm2d
    bn = BatchNorm2d(3)
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 4)).astype(np.float32)
    x[1, 2, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3\): the batch statistics are not finite"):
        bn(x)
    assert bn.running_var.tolist() == [1, 1, 1] and bn.running_mean.tolist() == [0, 0, 0]
    assert int(bn.num_batches_tracked) == 0
    model = build_deeplab(DeepLabConfig.small(), rng=np.random.default_rng(0)).train()
    before = {k: np.array(v) for k, v in model.state_dict().items()}
    image = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    image[0, 0, 5, 5] = np.nan
    with pytest.raises(NonFiniteError):
        model(image)
    assert all(np.array_equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_predict_and_evaluate_refuse_non_finite_logits(tmp_path, capsys, finished, command):
    """<command>-nan-checkpoint: a checkpoint with an Inf running variance (what a diverged run wrote before this
    fix): one line saying the logits are not finite, exit 1 (was '0 % foreground' / IoU 0)."""
    from PIL import Image

    from minideeplab.checkpoint import load_model
    _finished_run(tmp_path / "run", finished)
    model, meta = load_model(tmp_path / "run" / "best.npz")
    model.head.classifier.weight.data[...] = np.nan
    io.save(model, tmp_path / "nan.npz", {"train_config": meta["train_config"]})
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "x.png")
    argv = (["predict", str(tmp_path / "nan.npz"), str(tmp_path / "x.png"), "--out", str(tmp_path / "p")]
            if command == "predict" else ["evaluate", str(tmp_path / "nan.npz")])
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "logits) is not finite" in err, err


# -- real processes and real signals ------------------------------------------------------------------------------
# One epoch of 1000 steps: the signal always comes in the middle of epoch 1's training, never at an epoch end, so
# that the process never spends seconds importing Matplotlib and drawing curves.png; a line per step says how far
# it is (the first, "run folder: ...", is printed after last.npz of step 0 is written).
LONG = ["--model", "small", "--image-size", "16", "--epochs", "1", "--batch-size", "2", "--train-size", "2000",
        "--val-size", "2", "--quiet", "--no-augment", "--log-every", "1"]


def _start(folder):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "minideeplab.cli", "train", *LONG, "--out", str(folder)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(proc, folder, steps=2):
    """Until the run has saved step 0 and trained ``steps`` steps (it says so on stdout)."""
    deadline = threading.Timer(120, proc.kill)         # a run that hangs: its stdout ends, the test fails
    deadline.start()
    try:
        for line in proc.stdout:
            if line.startswith(f"step {steps}/"):
                assert (folder / "last.npz").exists()
                return
    finally:
        deadline.cancel()
    pytest.fail(f"the run ended before step {steps}: {proc.communicate(timeout=60)}")


def _resume_two_steps(folder):
    """The run resumes: two more steps, stopped, and the folder is complete again (temporary files removed)."""
    resumed = Trainer.from_checkpoint(folder / "last.npz", progress=False, figures=False)
    start = resumed.global_step
    resumed.on_step_end = lambda t: t.request_stop() if t.global_step == start + 2 else None
    with pytest.raises(Interrupted):
        resumed.fit()
    assert _check_folder(folder).meta["global_step"] == start + 2


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -9)],
                         ids=["kill-INT", "kill-TERM", "kill-9"])
def test_real_signal_to_the_cli(tmp_path, signum, code):
    """process-<signal>: ``kill -INT`` / ``kill -TERM`` to a training process: it saves, exits 130 / 143 with one line
    on stderr; ``kill -9``: no corrupt file (temporary files and the lock may stay, the next run removes them).
    The run then resumes."""
    proc = _start(tmp_path)
    _wait_for_steps(proc, tmp_path)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    if signum != signal.SIGKILL:
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("minideeplab train: interrupted")
    _check_folder(tmp_path, killed=signum == signal.SIGKILL)
    _resume_two_steps(tmp_path)


def test_closed_stdout_pipe(tmp_path):
    """process-broken-pipe: ``minideeplab train ... | head -1``: the reader closes the pipe after the first line; the
    run saves and exits 141 with no traceback, and resumes."""
    proc = _start(tmp_path)
    first = proc.stdout.readline()          # and the next one (step 1's log line) meets the closed pipe
    assert first.startswith("run folder:")
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    _check_folder(tmp_path)
    _resume_two_steps(tmp_path)
