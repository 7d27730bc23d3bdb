"""The side of ``train.Trainer`` that keeps its run folder consistent whatever stops the run.

``RunKeeping`` is mixed into ``Trainer``: it claims and locks the folder when ``fit`` starts (``runfolder.RunFolder``)
and makes it hold the run at once, keeps ``best.npz`` the checkpoint that ``last.npz`` records, turns a stop request
(signal, broken pipe) into a saved ``last.npz`` and ``runfolder.Interrupted``, and a divergence into
``finite.TrainingDiverged`` with the last finite state saved. It uses the trainer's state (``_position``,
``save``, ``history``, ``_saved_at``...) and keeps none of its own.
"""
from __future__ import annotations

import csv
import shutil
import warnings
from pathlib import Path

from .finite import TrainingDiverged
from .io import atomic_write, copy_file, read_meta
from .runfolder import EXIT_SIGPIPE, Interrupted, RunFolder, run_id_of, stderr_line

HISTORY_FIELDS = ("epoch", "step", "lr", "train_loss", "train_iou", "val_loss", "val_iou", "val_dice",
                  "val_precision", "val_recall", "val_accuracy", "val_boundary_iou", "seconds")


def write_history(path: Path, history: list) -> None:
    """``history.csv``: one row per epoch (``HISTORY_FIELDS``), written atomically."""
    with atomic_write(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        w.writeheader()
        w.writerows({k: row.get(k, "") for k in HISTORY_FIELDS} for row in history)


class RunKeeping:
    """Mixin of ``Trainer``: run folder, stops and messages (see the module docstring)."""

    def _open_run_folder(self):
        """Lock and claim ``out_dir``; make it hold this run at once: ``last.npz`` of the current state (step 0 of
        a new run), the history, and the ``best.npz`` that ``last.npz`` records."""
        if self.out_dir is None:
            return None
        folder = RunFolder(self.out_dir)
        removed = folder.open(self.run_id, self.global_step, self.overwrite, keep=self.resumed_from)
        try:
            replaced = [n for n in removed if not n.startswith(".tmp-")]
            if replaced:
                self._say(f"--overwrite: removed the earlier run's {', '.join(replaced)} from {self.out_dir}")
            last = self.out_dir / "last.npz"
            meta = read_meta(last) if last.exists() else None
            if meta and (run_id_of(meta), meta.get("epoch"), meta.get("step_in_epoch"), meta.get("global_step")) == (
                    self.run_id, *self._position()):
                self._saved_at = self._position()
            else:
                self.save(last)
            if self.history:
                self._write_history()
            self._sync_best()
            free, size = shutil.disk_usage(self.out_dir).free, last.stat().st_size
            if free < 2 * size:
                self._warn(f"{self.out_dir} has {free / 1e6:.0f} MB free and a checkpoint of this run takes "
                           f"{size / 1e6:.0f} MB: a full disk will stop the run at a checkpoint write")
        except BaseException:
            folder.close()
            raise
        return folder

    def _is_our_best(self, path: Path) -> bool:
        """``path`` is this run's best checkpoint (or a later one of this run: the resumed run rewrites it)."""
        try:
            meta = read_meta(path) if path.is_file() else None
        except ValueError:
            return False
        return bool(meta) and run_id_of(meta) == self.run_id and int(meta.get("epoch", -1)) >= self.best_epoch

    def _sync_best(self) -> None:
        """Make ``best.npz`` the checkpoint that ``last.npz`` records as the best: copy it from the folder resumed,
        or write it from the current state when that is the end of the best epoch; else say it is lost."""
        best = self.out_dir / "best.npz"
        if self.best_epoch is None or self._is_our_best(best):
            return
        source = self.resumed_from.parent / "best.npz" if self.resumed_from is not None else None
        if source is not None and source.resolve() != best.resolve() and self._is_our_best(source):
            copy_file(source, best)
        elif (self.epoch, self.step_in_epoch) == (self.best_epoch, 0) and self.epoch_order is None:
            self.save(best)
            self._say(f"wrote {best} (epoch {self.best_epoch}, the run's best, was missing or stale)")
        else:
            self._warn(f"{best} of epoch {self.best_epoch} (IoU {self.best_iou:.4f}) is missing or stale and cannot "
                       f"be rebuilt from a checkpoint of epoch {self.epoch}; a later improvement will write it")

    def _stopped(self):
        """Save ``last.npz`` (unless it already holds this state) and raise ``Interrupted``."""
        reason = self.stop.reason or "interrupted"
        self.stop.in_abortable = False
        if self.out_dir is None:
            message = f"{reason}: stopped at step {self.global_step} (no run folder: nothing saved)"
        else:
            last = self.out_dir / "last.npz"
            if self._saved_at != self._position():
                self.save(last)
            where = (f"the run's last, epoch {self.epoch}" if self.epoch >= self.cfg.epochs else
                     f"epoch {self.epoch + 1}, step {self.step_in_epoch}/{len(self.train_loader)}")
            message = f"{reason}: saved {last} at step {self.global_step} ({where}); continue with --resume {last}"
        self._say(message)
        if self.stop.exit_code == EXIT_SIGPIPE:    # the log's stream may be the one that broke: stderr too
            stderr_line(message)
        raise Interrupted(message, self.stop.exit_code, reason)

    def _diverged(self, why: str, at_epoch_end: bool = False):
        """Raise ``TrainingDiverged``: ``last.npz`` gets the state at the start of the failing step when it is
        finite (not at an epoch end: the state itself is what failed), else keeps the last one saved."""
        where = "" if at_epoch_end else f" at step {self.global_step + 1} (epoch {self.epoch + 1})"
        if self.out_dir is None:
            kept = "nothing saved (no run folder)"
        else:
            if not at_epoch_end and self._saved_at != self._position() and not self._state_problems():
                self._write(self.out_dir / "last.npz")
            kept = ("no checkpoint was written" if self._saved_at is None else
                    f"{self.out_dir / 'last.npz'} keeps step {self._saved_at[2]}, the last finite state")
        raise TrainingDiverged(f"training diverged{where}: {why}; {kept}; lower the learning rate "
                               f"(--lr, {self.cfg.lr:g} now)") from None

    def _named(self, e: Exception) -> str:
        layer = getattr(e, "layer", None)
        name = next((n for n, m in self.model.named_modules() if m is layer), None)
        return f"the batch statistics of {name} are not finite" if name else str(e)

    def _write_history(self) -> None:
        try:
            write_history(self.out_dir / "history.csv", self.history)
        except OSError as e:
            self._warn(f"{e}; the history is also in last.npz")

    def _figure(self, name: str, draw) -> None:
        """Draw a figure; a second signal may abort it (the checkpoints are written), a failure is a warning."""
        try:
            with self.stop.abortable():
                draw()
        except KeyboardInterrupt:
            self._stopped()
        except Exception as e:
            self._warn(f"could not write {self.out_dir / name} ({' '.join(str(e).split())}); training goes on")

    def _say(self, line: str) -> None:
        """``log(line)``; when the log's reader has gone (a broken pipe), stop the run as SIGPIPE would, but after
        saving, and send the remaining lines to stderr."""
        if self.log is None:
            return
        try:
            self.log(line)
        except BrokenPipeError:
            self.log = stderr_line
            self._on_broken_pipe()
            stderr_line(line)

    def _warn(self, text: str) -> None:
        if self.log is None:
            warnings.warn(text, RuntimeWarning, stacklevel=3)
        else:
            self._say(f"warning: {text}")

    def _on_broken_pipe(self) -> None:
        self.stop.request("output closed (broken pipe)", EXIT_SIGPIPE)
