"""Safe writing of every file emcad produces (checkpoints, models, logs, CSV, JSON, PNG) and content hashes.

* :func:`atomic_write` / :func:`atomic_write_bytes`: the data goes to a temporary file beside the target
  (``mkstemp``), is flushed and fsynced, then moved into place with ``os.replace``: a reader, a crash or a full
  disk never leaves a half-written file, and the previous version stays until the new one is complete.
* :func:`atomic_write_dir`: a whole folder (a ``save_pretrained`` model) is written into a temporary sibling,
  fsynced, and swapped in: the old folder is renamed aside to ``.NAME.old``, the new one renamed in, the old one
  removed. A crash between the two renames leaves only ``.NAME.old``; :func:`recover_interrupted_swap` (called
  by the next write) puts it back, and readers use it meanwhile (:func:`folder_to_read`).
* Permissions follow the umask like ``open()`` and ``mkdir`` do (``mkstemp``/``mkdtemp`` alone would give
  0600/0700): files ``0o666 & ~umask``, folders ``0o777 & ~umask``.
* SIGINT/SIGTERM during a write: when the process would die (default handlers), the write is abandoned, its
  temporary file or folder removed, and the signal then takes its usual effect (KeyboardInterrupt, or death by
  SIGTERM: exit status 143 in a shell). When a program handles the signal itself (``emcad train`` finishes the
  step and saves), the write completes and the handler runs as usual.
* Failures (read-only folder, full disk) raise :class:`WriteError`, an ``OSError`` whose message is one line:
  ``cannot write checkpoint to PATH: No space left on device``.
* :func:`tensors_sha256` / :func:`object_sha256`: content hashes that checkpoints record and loaders verify.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import tempfile
import threading
from typing import Any, BinaryIO, Callable, Mapping

__all__ = ["WriteError", "atomic_write", "atomic_write_bytes", "atomic_write_dir", "dir_mode", "file_mode",
           "folder_to_read", "makedirs", "object_sha256", "recover_interrupted_swap", "tensors_sha256"]


class WriteError(OSError):
    """A file or folder cannot be written; ``str()`` is one line naming what, where and why."""

    def __init__(self, what: str, path: str | os.PathLike, cause: BaseException):
        reason = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
        self.message = f"cannot write {what} to {os.fspath(path)}: {reason}"
        super().__init__(self.message)
        self.errno = getattr(cause, "errno", None)
        self.path = os.fspath(path)

    def __str__(self) -> str:
        return self.message


# --------------------------------------------------------------------------------------------------
# permissions
# --------------------------------------------------------------------------------------------------
_umask_lock = threading.Lock()


def current_umask() -> int:
    try:  # Linux >= 4.7 reports it without changing it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode ``os.mkdir`` would give a new folder."""
    return 0o777 & ~current_umask()


def makedirs(path: str | os.PathLike, what: str = "folder") -> None:
    """``os.makedirs(path, exist_ok=True)`` (umask-honouring), raising :class:`WriteError` on failure."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise WriteError(what, path, e) from e


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(folder)


# --------------------------------------------------------------------------------------------------
# signals during a write
# --------------------------------------------------------------------------------------------------
class _WriteInterrupted(BaseException):
    """Raised by the temporary SIGINT/SIGTERM handler to abandon a write (cleaned up by the writer)."""


@contextlib.contextmanager
def _signals_abandon_write():
    """While the body runs, SIGINT/SIGTERM that would end the process (default handlers) abandon the write
    instead, and take their usual effect once the writer has cleaned up. Signals with a Python handler of the
    program's own (or ignored) are left alone. Nested uses see this handler and install nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    state = {"signum": None, "closing": False}

    def handler(signum, frame):
        if state["signum"] is None:
            state["signum"] = signum
            if not state["closing"]:
                raise _WriteInterrupted()

    previous = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(s)
        if current in (signal.SIG_DFL, signal.default_int_handler, None):
            previous[s] = signal.SIG_DFL if current is None else current
            signal.signal(s, handler)
    try:
        try:
            yield
        finally:
            state["closing"] = True
            for s, h in previous.items():
                signal.signal(s, h)
    except _WriteInterrupted:
        pass
    signum = state["signum"]
    if signum is None:
        return
    if previous.get(signum) is signal.default_int_handler:
        raise KeyboardInterrupt
    os.kill(os.getpid(), signum)  # the default action: the process ends here
    raise SystemExit(128 + signum)


# --------------------------------------------------------------------------------------------------
# files and folders
# --------------------------------------------------------------------------------------------------
def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, what: str = "file") -> None:
    """Call ``write(f)`` on a binary file beside ``path`` and move it into place once complete and fsynced.
    ``what`` names the file in a :class:`WriteError` ("checkpoint", "log", ...)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    makedirs(directory, what=what)
    with _signals_abandon_write():
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
            with os.fdopen(fd, "wb") as f:
                if hasattr(os, "fchmod"):  # POSIX: mkstemp made it 0600
                    os.fchmod(f.fileno(), file_mode())
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
            _fsync_dir(directory)
        except WriteError:
            raise
        except OSError as e:
            raise WriteError(what, path, e) from e
        finally:
            if tmp is not None:
                _remove_quietly(tmp)


def atomic_write_bytes(path: str | os.PathLike, payload: bytes, *, what: str = "file") -> None:
    """Write ``payload`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(payload), what=what)


def _aside_path(path: str) -> str:
    parent, name = os.path.split(path)
    return os.path.join(parent, f".{name}.old")


def recover_interrupted_swap(path: str | os.PathLike) -> None:
    """Finish what a crash during :func:`atomic_write_dir` left: if ``path`` is missing but its aside copy
    ``.NAME.old`` exists (the crash came between the two renames), put the copy back; if both exist (the crash
    came after the swap), remove the stale copy."""
    path = os.path.abspath(os.fspath(path))
    aside = _aside_path(path)
    if not os.path.isdir(aside):
        return
    if os.path.lexists(path):
        shutil.rmtree(aside, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):  # read-only: the write that follows reports it
            os.replace(aside, path)


def folder_to_read(path: str | os.PathLike) -> str:
    """``path``, or its aside copy ``.NAME.old`` when ``path`` is missing because a folder swap was cut off between
    its two renames (readers change nothing; the next write puts the copy back)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        aside = _aside_path(os.path.abspath(path))
        if os.path.isdir(aside):
            return aside
    return path


def _remove_stale_temporaries(path: str) -> None:
    """Temporary folders of this path left by a killed writer (SIGKILL, power loss)."""
    parent, name = os.path.split(path)
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        if entry.startswith(f".{name}.") and entry.endswith(".tmp"):
            full = os.path.join(parent, entry)
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full, ignore_errors=True)


def atomic_write_dir(path: str | os.PathLike, write: Callable[[str], None], *, what: str = "folder") -> None:
    """Fill a fresh temporary sibling folder with ``write(tmpdir)``, fsync it, and swap it in place of ``path``
    (see the module docstring). A reader sees the old folder or the new one, complete."""
    path = os.path.realpath(os.fspath(path))  # a symlinked folder: replace its target, keep the link
    parent = os.path.dirname(path)
    makedirs(parent, what=what)
    recover_interrupted_swap(path)
    _remove_stale_temporaries(path)
    aside = _aside_path(path)
    with _signals_abandon_write():
        tmp = None
        try:
            tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
            os.chmod(tmp, dir_mode())
            write(tmp)
            _fsync_tree(tmp)
            if os.path.lexists(path):
                os.replace(path, aside)
            os.replace(tmp, path)
            tmp = None
            _fsync_dir(parent)
        except WriteError:
            raise
        except OSError as e:
            raise WriteError(what, path, e) from e
        finally:
            # decided from what is on disk: a signal can land between a rename and the next statement
            if tmp is not None and not os.path.lexists(path) and os.path.isdir(aside):
                with contextlib.suppress(OSError):
                    os.replace(aside, path)  # the swap did not happen: the old folder goes back
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if os.path.lexists(path) and os.path.isdir(aside):
                shutil.rmtree(aside, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# content hashes
# --------------------------------------------------------------------------------------------------
def _update_with_tensor(h, t) -> None:
    import torch

    t = t.detach()
    h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        data = t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        h.update(data)


def tensors_sha256(tensors: Mapping[str, Any]) -> str:
    """sha256 over the tensors sorted by name: each name, dtype, shape and raw bytes (``model.safetensors``)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(f"K{len(key)}:{key}".encode())
        _update_with_tensor(h, tensors[key])
    return h.hexdigest()


def _update_with_object(h, obj: Any) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        _update_with_tensor(h, obj)
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}".encode())
        for key, value in obj.items():
            _update_with_object(h, key)
            _update_with_object(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for value in obj:
            _update_with_object(h, value)
    elif isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        h.update(f"S{len(data)}:".encode() + data)
    else:  # bool, int, float (repr round-trips exactly), None, anything else by its repr
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def object_sha256(obj: Any) -> str:
    """sha256 of a checkpoint-like object (nested dicts, lists and tuples of tensors and plain values), in
    its own order: the same after a ``torch.save`` / ``torch.load`` round trip."""
    h = hashlib.sha256()
    _update_with_object(h, obj)
    return h.hexdigest()
