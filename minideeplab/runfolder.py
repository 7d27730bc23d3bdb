"""A training run's folder and its stop signals: one run per folder, locked while it runs, stopped only where its
state can be saved.

- ``RunFolder``: refuses a folder that holds another run (unless told to overwrite it) or that cannot be written,
  locks it (``fcntl.flock`` on ``DIR/.lock``, released when the run ends, by the kernel if the process dies) and
  removes the temporary files that killed writes left behind (``io.atomic_write``'s ``.tmp-*``).
- ``new_run_dir``: a fresh ``runs/<date>-<time>-<milliseconds>`` folder, made with an exclusive ``mkdir``.
- ``StopSignals``: SIGINT (Ctrl-C) and SIGTERM ask a run to stop at its next safe point; a second one aborts the
  work in progress only where the trainer can roll it back (a step before its update, validation, a figure).
- ``guarded_std_streams``: while a run trains, stdout and stderr are ``SafeStream`` s: when their reader goes away
  (``minideeplab train ... | head -1``) the run is asked to stop (after saving, as a SIGPIPE would end it) instead
  of dying in the middle of a save.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import sys
import tempfile
import threading
import uuid
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

try:
    import fcntl
except ImportError:          # Windows: no advisory locks, folders are not locked
    fcntl = None

RUN_FILES = ("last.npz", "best.npz", "history.csv", "curves.png", "predictions.png")
LOCK_NAME = ".lock"
EXIT_SIGINT, EXIT_SIGPIPE, EXIT_SIGTERM = 130, 141, 143    # 128 + the signal's number, as a shell reports it


class RunFolderError(ValueError):
    """The run folder cannot be used: another run owns it, or holds it right now."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal or a broken pipe, after saving what it could (``str(e)`` says what);
    ``reason``: what stopped it (``Ctrl-C``, ``SIGTERM``...), ``exit_code``: 128 + the signal's number."""

    def __init__(self, message: str = "interrupted", exit_code: int = EXIT_SIGINT, reason: str = "interrupted"):
        super().__init__(message)
        self.exit_code, self.reason = exit_code, reason


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def run_id_of(meta: dict) -> str:
    """The run a checkpoint belongs to: its ``run_id``; for checkpoints written before run ids, one derived from the
    training config (all of a run's checkpoints share it)."""
    if meta.get("run_id"):
        return str(meta["run_id"])
    config = json.dumps(meta.get("train_config"), sort_keys=True)
    return "legacy-" + hashlib.sha1(config.encode()).hexdigest()[:12]


def new_run_dir(root="runs") -> Path:
    """Create and return ``root/<YYYYmmdd-HHMMSS-mmm>`` (``-2``, ``-3``... appended when taken): two runs started in
    the same millisecond still get two folders, since ``mkdir`` succeeds for one process only."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")[:-3]
    try:
        os.makedirs(root, exist_ok=True)
        for n in range(1, 10_000):
            path = Path(root) / (stamp if n == 1 else f"{stamp}-{n}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as e:
        raise OSError(e.errno, f"cannot create a run folder in {os.fspath(root)!r}: {e.strerror}") from None
    raise RunFolderError(f"cannot create a run folder in {os.fspath(root)!r}: 10000 folders named {stamp}-*")


class RunFolder:
    """The folder of one training run. ``check`` (no side effects) says whether a run may use it; ``open`` does the same while holding the folder's lock, removes stale temporary files and, with
    ``overwrite``, the files of the run that was there before; ``close`` releases the lock."""

    def __init__(self, path):
        self.path = Path(path)
        self._fd = None

    def check(self, run_id: str | None, global_step: int, overwrite: bool = False) -> list[str]:
        """Raise ``RunFolderError`` when the folder holds another run (or a later state of this one) and not
        ``overwrite``, or is locked by a live run; ``OSError`` naming the folder when it cannot be written.
        Returns the names of the files a run there would replace (those of another run, with ``overwrite``)."""
        self._check_writable()
        if not self.path.is_dir():
            return []
        if self._fd is None:
            holder = self._lock_holder()
            if holder is not None:
                raise RunFolderError(f"run folder {os.fspath(self.path)!r} is in use by another run ({holder}); "
                                     "wait for it to end or choose another --out")
        present = [n for n in RUN_FILES if (self.path / n).exists()]
        if not present:
            return []
        other = self._owner_conflict(run_id, global_step, present)
        if other and not overwrite:
            raise RunFolderError(f"run folder {os.fspath(self.path)!r} {other}; continue that run with --resume "
                                 f"{os.fspath(self.path / 'last.npz')!r}, replace it with --overwrite, or choose "
                                 "another --out")
        return present if other else []

    def open(self, run_id: str, global_step: int, overwrite: bool = False, keep=None) -> list[str]:
        """Lock the folder, ``check`` it, remove leftover temporary files and (``overwrite``) the other run's files
        except ``keep`` (the checkpoint being resumed). Returns the names of the files removed."""
        self._check_writable(create=True)
        self._lock()
        try:
            stale = self.check(run_id, global_step, overwrite)
            removed = []
            for p in self.path.glob(".tmp-*"):        # no live run writes here: we hold the lock
                p.unlink(missing_ok=True)
                removed.append(p.name)
            keep = Path(keep).resolve() if keep is not None else None
            for name in stale:
                if (self.path / name).resolve() != keep:
                    (self.path / name).unlink(missing_ok=True)
                    removed.append(name)
        except BaseException:
            self.close()
            raise
        return removed

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.path / LOCK_NAME)     # while still holding it: see _lock's inode check
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None

    # -- internals ------------------------------------------------------------------------------------------------
    def _check_writable(self, create: bool = False) -> None:
        """Create a file in the folder (``create``: made first) or, when it does not exist yet, in the nearest
        folder above it that does, and remove it: an OSError naming the run folder if that fails."""
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"run folder {os.fspath(self.path)!r} is a file, not a folder")
        try:
            if create:
                self.path.mkdir(parents=True, exist_ok=True)
            where = self.path
            while not where.is_dir() and where != where.parent:
                where = where.parent
            fd, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=where)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise OSError(e.errno, f"run folder {os.fspath(self.path)!r} cannot be written: {e.strerror}") from None

    def _owner_conflict(self, run_id, global_step, present) -> str | None:
        """None when the folder's files are this run's at or before ``global_step``; else what is there."""
        from .io import read_meta
        try:
            meta = read_meta(self.path / "last.npz") if "last.npz" in present else None
        except ValueError:
            return "holds an unreadable last.npz"
        if meta is None:
            return f"holds files of another run ({', '.join(present)})"
        step = int(meta.get("global_step", 0))
        if run_id is None or run_id_of(meta) != run_id:
            return f"holds another run (last.npz at step {step}, epoch {meta.get('epoch', '?')})"
        if step > global_step:
            return (f"holds a later state of this run (last.npz at step {step}; the checkpoint resumed is at step "
                    f"{global_step}), which resuming here would replace")
        return None

    def _lock(self) -> None:
        if fcntl is None or self._fd is not None:
            return
        path = self.path / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_pid(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise RunFolderError(f"run folder {os.fspath(self.path)!r} is in use by another run "
                                     f"({holder or 'another process'}); wait for it to end or choose another --out"
                                     ) from None
            try:          # a run that was releasing it may have unlinked the file we opened: lock the new one then
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def _lock_holder(self) -> str | None:
        """'process N' when a live run holds the folder's lock, else None (the lock is not taken)."""
        if fcntl is None:
            return None
        try:
            fd = os.open(self.path / LOCK_NAME, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_pid(fd) or "another process"
        else:
            return None
        finally:
            os.close(fd)


def _read_pid(fd) -> str | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return f"process {text}" if text.isdigit() else None


class StopSignals:
    """SIGINT and SIGTERM handlers for the duration of a ``with`` block (main thread only; elsewhere nothing is
    installed). The first signal sets ``reason`` (the trainer stops at its next safe point and saves); another one
    raises ``KeyboardInterrupt`` only inside ``abortable()``, where the trainer can roll the work back. Messages go
    straight to file descriptor 2: a handler must not write through a Python stream it may have interrupted."""

    NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
    CODES = {signal.SIGINT: EXIT_SIGINT, signal.SIGTERM: EXIT_SIGTERM}

    def __init__(self):
        self.reason, self.exit_code, self.in_abortable = None, EXIT_SIGINT, False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.NAMES:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def request(self, reason: str, exit_code: int = EXIT_SIGINT) -> None:
        """Ask the run to stop at its next safe point (the first request's reason is kept)."""
        if self.reason is None:
            self.reason, self.exit_code = reason, exit_code

    @contextmanager
    def abortable(self):
        """Work that a second signal may abort with ``KeyboardInterrupt`` (the caller rolls it back)."""
        self.in_abortable = True
        try:
            yield
        finally:
            self.in_abortable = False

    def _handle(self, signum, frame):
        name = self.NAMES.get(signum, f"signal {signum}")
        if self.reason is None:
            self.request(name, self.CODES.get(signum, 128 + signum))
            notice(f"\n{name}: stopping after this step and saving last.npz (Ctrl-C again to abort the step)\n")
        elif self.in_abortable:
            self.in_abortable = False           # one abort per region, however many signals follow
            raise KeyboardInterrupt
        else:
            notice(f"\n{name}: already stopping; finishing what must not be cut short (an update, a write)\n")


def notice(text: str) -> None:
    """Write ``text`` to file descriptor 2 at once (safe in a signal handler); ignore a closed stderr."""
    try:
        os.write(2, text.encode(errors="replace"))
    except OSError:
        pass


class SafeStream:
    """Wrap a text stream: a write or flush that meets a broken pipe calls ``on_broken()`` once and is dropped, as
    are all writes after it; everything else is the wrapped stream's."""

    def __init__(self, stream, on_broken):
        self._stream, self._on_broken, self.broken = stream, on_broken, False

    def write(self, text):
        return self._guard(self._stream.write, text)

    def flush(self):
        return self._guard(self._stream.flush)

    def _guard(self, fn, *args):
        if self.broken:
            return None
        try:
            return fn(*args)
        except BrokenPipeError:
            self.broken = True
            self._on_broken()
            return None

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextmanager
def guarded_std_streams(on_broken):
    """Within: ``sys.stdout`` and ``sys.stderr`` are ``SafeStream`` s (log lines, ``print``, progress bars: tqdm also
    flushes both streams itself), so that a reader that went away asks the run to stop instead of killing it."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (SafeStream(s, on_broken) if s is not None else None for s in saved)
    try:
        yield
    finally:
        if isinstance(sys.stdout, SafeStream):
            sys.stdout = saved[0]
        if isinstance(sys.stderr, SafeStream):
            sys.stderr = saved[1]


def stderr_line(line: str) -> None:
    """Print ``line`` on stderr, ignoring a closed stderr (where log lines go once stdout's reader has gone)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
