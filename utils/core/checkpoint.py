"""Checkpoints: nanoGPT's dict (weights, optimizer, step, config), written atomically and read
without pickle.

A save goes to a temporary file beside the target and is moved over it with `os.replace`, so
an interrupted or failed save (Ctrl-C, a full disk) leaves the previous file intact and removes
its temporary file. Every file the project writes holds only tensors and plain Python values, so
it loads with `torch.load(weights_only=True)`; a file that needs pickle (a foreign checkpoint can
run code when unpickled) is refused unless the caller passes `trust=True` (the scripts'
`--trust_checkpoint`). A model's stored config is compared with the current one by
`utils.core.config.check_architecture`, which names the flag that differs. A run that writes
a folder holds a lock file there (`folder_lock`), so two runs never interleave their files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import pickle
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from utils.core.errors import CheckpointError, ConfigError, StorageError

logger = logging.getLogger(__name__)

TEMPORARY_GLOB = ".*.tmp"  # atomic_write's temporary files: .<name>.<random>.tmp
TRAIN_LOCK = "train.lock"  # the folder_lock a training holds in its save path


OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no later write can succeed either
_HINTS = {
    errno.ENOSPC: "free space on the disk or choose another folder",
    errno.EDQUOT: "free space within your disk quota or choose another folder",
    errno.EFBIG: "a file-size limit (ulimit -f) stops it: raise it or choose another folder",
    errno.EACCES: "the folder is not writable: choose another one",
    errno.EROFS: "the folder is not writable: choose another one",
    errno.EPERM: "the folder is not writable: choose another one",
    errno.ENAMETOOLONG: "a name in the path is too long for the file system: shorten it",
}


def _storage_error(path: Path, error: BaseException) -> StorageError:
    """One line naming the cause; only a full disk or quota is told to free space."""
    if isinstance(error, OSError):
        reason = os.strerror(error.errno) if error.errno else str(error)
        hint = _HINTS.get(error.errno, "fix that or choose another folder")
    else:  # torch's C++ writer reports only positions: say what makes a write stop short
        reason = "the write stopped short: a full disk or a file-size limit"
        hint = _HINTS[errno.ENOSPC]
    return StorageError(f"cannot write {path} ({reason}); {hint} (the previous file is intact)")


def storage_error(path: Path, error: BaseException) -> StorageError:
    """The one-line StorageError for a failed write of `path`, as `atomic_write` raises it
    (for files written otherwise, such as one appended row by row)."""
    return _storage_error(path, error)


def out_of_space(error: BaseException) -> bool:
    """Whether a failed write (`atomic_write`'s StorageError, or the error itself) ran out of
    space: a full disk, a quota, a file-size limit, or torch's writer stopping short. Every
    later write would fail too; other failures (a name too long) concern one file."""
    cause = error.__cause__ if isinstance(error, StorageError) else error
    if isinstance(cause, OSError):
        return cause.errno in OUT_OF_SPACE
    return cause is not None and _is_write_failure(cause)


def _is_write_failure(error: BaseException) -> bool:
    """An OSError, or torch.save's C++ writer failing on a full disk or a size limit."""
    if isinstance(error, OSError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "PytorchStreamWriter" in text or "file write failed" in text or "inline_container" in text
    )


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while a file is written, then act on them: a signal inside
    torch.save's C++ writer would otherwise surface as a failed write, and a save this short
    is better finished than rolled back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    watched = (signal.SIGINT, signal.SIGTERM)
    previous = {
        sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in watched
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(pending):
            if callable(previous[sig]):
                previous[sig](sig, None)  # raises KeyboardInterrupt, or the script's SIGTERM exit
            elif previous[sig] == signal.SIG_DFL:
                os.kill(os.getpid(), sig)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


_CREATE_MODE = 0o666 & ~_umask()  # what open() would give a new file


def atomic_write(path: Path, write: Any, mode: str = "wb") -> None:
    """Call `write(file)` on a temporary file beside `path`, then move it over `path`. A write
    that fails (disk full, read-only folder) raises StorageError; the temporary file is removed
    and the previous `path` stays as it was. Ctrl-C and SIGTERM wait until the file is done."""
    with _signals_deferred():
        _atomic_write(Path(path), write, mode)


def _atomic_write(path: Path, write: Any, mode: str) -> None:
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(handle, _CREATE_MODE)  # mkstemp's 0600 would hide results from the group
        text = {} if "b" in mode else {"encoding": "utf-8"}  # whatever the locale
        with os.fdopen(handle, mode, **text) as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, path)
    except BaseException as error:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
        if _is_write_failure(error):
            raise _storage_error(path, error) from error
        raise


@contextlib.contextmanager
def replaced_folder(folder: Path) -> Iterator[Path]:
    """A new temporary folder beside `folder` to fill; when the block ends without error it
    becomes `folder` whole (the previous one renamed aside, the new one renamed in, the old one
    removed), so no file of the previous contents stays beside the new ones. An error or an
    interruption removes the temporary folder and leaves `folder` as it was."""
    folder = Path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(
            tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent)
        )
        staging.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would hide the folder from the group
    except OSError as error:
        raise _storage_error(folder, error) from error
    try:
        yield staging
        with _signals_deferred():
            try:
                _swap(staging, folder)
            except OSError as error:
                raise _storage_error(folder, error) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap(staging: Path, folder: Path) -> None:
    """Rename `folder` aside, `staging` in its place, remove the old one; on a failed rename
    the old one goes back."""
    aside = None
    if folder.exists():
        aside = staging.with_name(f"{staging.name.removesuffix('.tmp')}.old.tmp")
        os.rename(folder, aside)
    try:
        os.rename(staging, folder)
    except OSError:
        if aside is not None:
            os.rename(aside, folder)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _non_finite(value: Any, key: str = "") -> str:
    """The first key whose floating tensor holds NaN or inf ('' when all are finite)."""
    if isinstance(value, torch.Tensor):
        finite = not value.is_floating_point() or bool(torch.isfinite(value).all())
        return "" if finite else key
    if isinstance(value, dict | list | tuple):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for name, item in items:
            found = _non_finite(item, f"{key}.{name}" if key else str(name))
            if found:
                return found
    return ""


def check_writable(folder: Path, flag: str) -> None:
    """Create `folder` if needed and write a probe file in it: a read-only or missing-parent
    folder is one line before any work is done."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        where = f"{folder} (the working directory)" if folder == Path() else folder
        raise StorageError(f"cannot write to {where} ({reason}); choose another {flag}") from error


def check_creatable(path: Path, flag: str) -> None:
    """`path` can be made (or replaced) later: the nearest existing folder above it takes a
    probe file. A folder written only after other work (a generated data set) fails in one line
    before any work, and nothing is created."""
    path = Path(path)
    above = next(folder for folder in path.parents if folder.exists())  # '.' always exists
    try:
        with tempfile.TemporaryFile(dir=above):
            pass
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        where = "the working directory" if above == Path() else str(above)
        raise StorageError(
            f"cannot create {path}: {where} is not writable ({reason}); pass {flag} to a "
            "writable folder"
        ) from error


def lock_owner(path: Path) -> tuple[int | None, str | None] | None:
    """Who holds the lock file `path` (a `folder_lock`): (PID, host), each None where the file
    does not say (it is being written, or it is foreign); None when there is no lock."""
    try:
        fields = Path(path).read_text().split()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return None, None
    pid = int(fields[0]) if fields and fields[0].isdigit() else None
    return pid, fields[1] if len(fields) > 1 else None


def held(path: Path) -> tuple[int | None, str | None] | None:
    """The owner of the lock file `path` while it holds it, else None: no lock, or a stale one
    (a PID on this host that no longer runs: its process was killed). A lock of another host,
    or one whose owner it does not name, counts as held."""
    owner = lock_owner(path)
    return None if owner is None or _stale(owner) else owner


def _stale(owner: tuple[int | None, str | None]) -> bool:
    """Whether a lock's owner is a process of this host that no longer runs."""
    pid, host = owner
    return pid is not None and host == socket.gethostname() and not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def folder_lock(folder: Path, name: str, what: str, flag: str) -> Iterator[Path]:
    """Hold `<folder>/<name>` (PID and host) while a run (`what`: "training", "scoring")
    writes to `folder`: a second run into it is refused in one line (ConfigError naming the
    owner and `flag`, the way out); a stale lock (its process gone) is taken over; the lock is
    removed on exit, however the run ends. Yields the lock file's path.

    The holder also holds an advisory lock (`flock`) on the file, which the kernel releases when
    its process dies: taking over a stale lock is holding that flock, so two runs that start
    together on a dead owner's lock cannot both take it over (deleting and re-creating the file,
    as before, let the second delete the first one's fresh lock)."""
    path = Path(folder) / name
    for _ in range(8):  # a lock released and replaced meanwhile: look again
        handle = _lock_file(path, folder, what, flag)
        if handle is not None:
            break
    else:
        raise ConfigError(f"cannot take the lock {path}; delete it if no {what} runs there")
    try:
        os.ftruncate(handle, 0)
        os.write(handle, f"{os.getpid()} {socket.gethostname()}\n".encode())
    except OSError as error:
        os.close(handle)
        raise _storage_error(path, error) from error
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)  # before the flock goes: a waiter then finds it gone
        os.close(handle)


def _lock_file(path: Path, folder: Path, what: str, flag: str) -> int | None:
    """The descriptor of `path` with its flock held, or None when the file was replaced while
    this looked (try again); a held lock is a ConfigError."""
    try:
        handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, _CREATE_MODE)
        fcntl.flock(handle, fcntl.LOCK_EX)  # new and ours; a reader's flock is brief
        created = True
    except FileExistsError:
        created = False
    except OSError as error:
        raise _storage_error(path, error) from error
    if not created:
        try:
            handle = os.open(path, os.O_RDWR)
        except FileNotFoundError:  # released meanwhile
            return None
        except OSError as error:
            raise _storage_error(path, error) from error
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            raise _held_error(folder, what, flag, path, lock_owner(path)) from None
    try:
        same = os.stat(path).st_ino == os.fstat(handle).st_ino
    except FileNotFoundError:
        same = False
    if not same:  # released (unlinked) while this waited for its flock
        os.close(handle)
        return None
    owner = lock_owner(path)
    if created or owner is None:
        return handle
    if _stale(owner):
        logger.warning("taking over the stale lock %s of PID %d (gone)", path, owner[0])
        return handle
    os.close(handle)  # a live owner of another host or version, or one it does not name
    raise _held_error(folder, what, flag, path, owner)


def _held_error(
    folder: Path, what: str, flag: str, path: Path, owner: tuple[int | None, str | None] | None
) -> ConfigError:
    pid, host = owner if owner is not None and not _stale(owner) else (None, None)
    where = f"PID {pid} on {host or '?'}" if pid is not None else "another run"
    return ConfigError(
        f"another {what} ({where}) is writing to {folder}; wait for it, choose another "
        f"{flag}, or delete {path} if that run is gone"
    )


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the temporary files of saves that a killed process left in `folder`; the count."""
    stale = [path for path in Path(folder).glob(TEMPORARY_GLOB) if path.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        logger.warning("removed %d temporary files of interrupted saves in %s", len(stale), folder)
    return len(stale)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """`torch.save(payload)` to `path` atomically."""
    atomic_write(Path(path), lambda file: torch.save(payload, file))


def load_checkpoint(
    path: Path, map_location: str | torch.device = "cpu", trust: bool = False
) -> dict[str, Any]:
    """Load a checkpoint dict with `weights_only=True`; a missing or unreadable file, or one
    that needs pickle without `trust` (`--trust_checkpoint`), raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check --save_path/--checkpoint")
    try:
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            if "Unsupported global" not in str(error):  # garbage, not a pickle of objects
                raise
            if not trust:
                msg = (
                    f"checkpoint {path} holds Python objects that only pickle can load, and "
                    "unpickling can run code; pass --trust_checkpoint if you trust its source"
                )
                raise CheckpointError(msg) from error
            payload = torch.load(path, map_location=map_location, weights_only=False)
    except CheckpointError:
        raise
    except Exception as error:  # torch raises many types for a truncated or foreign file
        msg = f"checkpoint {path} cannot be read ({type(error).__name__}); delete it and retrain"
        raise CheckpointError(msg) from error
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} is not a dict of tensors; was it written here?")
    broken = _non_finite(payload)
    if broken:
        raise CheckpointError(
            f"checkpoint {path} holds non-finite values ({broken}): the run that wrote it "
            "diverged; retrain it with a lower learning rate or --amp none"
        )
    return payload


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
