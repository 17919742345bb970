"""Atomic writes: a crash or bad input never leaves a half-written file behind.

Every writer goes through :func:`atomic_path`, which

- refuses a target that exists and is not a regular file (a directory, a symlink, a
  device such as ``/dev/full``, a pipe): it is never replaced;
- writes to a hidden temporary file next to the target, named
  ``.<name>.<host>-<pid>.<random><suffix>``, and renames it over the target only when the
  writer succeeded;
- gives the result the target's existing permission bits (a 0600 file stays 0600), or
  the umask's default for a new file;
- deletes the temporaries of earlier writes of the same target whose process died
  (e.g. SIGKILL), recognised by their name, host and a pid that no longer runs.

The torch and numpy writers produce the same bytes for the same content.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import socket
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from harness.errors import InputError

# numpy's .npz members carry a timestamp; a fixed one makes the bytes depend on the content only.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def _describe_non_regular(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_output_path(path: str | os.PathLike, what: str = "output file") -> Path:
    """``path`` as a ``Path`` if a file can be written there; ``InputError`` naming why not.

    The target must be missing or a regular file (never a directory, symlink or device),
    and its nearest existing folder must be a writable directory. Call it before long
    work so that a bad path fails in the first second, not after the computation.
    """
    path = _as_path(path, what)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise InputError(f"{what} {path} cannot be inspected: {exc.strerror}") from exc
    if mode is not None and not stat.S_ISREG(mode):
        raise InputError(f"{what} {path} is {_describe_non_regular(mode)}, not a regular file: refusing to replace it")
    _check_writable(path.absolute().parent, f"{what} {path}")
    return path


def _as_path(path: Any, what: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"{what} must be a path; got {type(path).__name__}")
    if str(path).strip() == "":
        raise InputError(f"{what} is an empty path")
    return Path(path)


def _check_writable(folder: Path, what: str) -> None:
    """``folder``, or its nearest existing ancestor (folders are created as needed), must be a
    directory where a file can be created: a probe file is created and deleted. Unlike
    ``os.access`` this also catches read-only mounts, pseudo file systems (/proc) and root,
    to whom permissions do not apply."""
    while not folder.exists() and not folder.is_symlink():
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"{what}: {folder} exists and is not a directory")
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".infembed-probe-"):
            pass
    except OSError as exc:
        raise InputError(f"{what}: folder {folder} is not writable ({exc.strerror})") from exc


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{socket.gethostname()}-{os.getpid()}."


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Deletes temporaries of ``path`` left by a killed writer on this host; returns them."""
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?P<host>.+)-(?P<pid>\d+)\.[A-Za-z0-9_]{{8}}(\..*)?$")
    host, removed = socket.gethostname(), []
    if not path.parent.is_dir():
        return removed
    for candidate in path.parent.iterdir():
        match = pattern.match(candidate.name)
        if match is None or match["host"] != host or _pid_running(int(match["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISREG(os.lstat(candidate).st_mode):
                candidate.unlink()
                removed.append(candidate)
    return removed


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yields a temporary path next to ``path``; on success it replaces ``path``.

    ``suffix`` matters to writers that infer the format from it (e.g. matplotlib's savefig).
    Raises ``InputError`` (before anything is written) when ``path`` cannot be a target;
    see :func:`check_output_path`.
    """
    path = check_output_path(path)
    created = [folder for folder in path.absolute().parents if not folder.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the folder of {path}: {exc.strerror}") from exc
    remove_stale_temporaries(path)
    existing = path.stat().st_mode if path.exists() else None
    mode = stat.S_IMODE(existing) if existing is not None else _new_file_mode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=suffix)
    os.close(fd)
    done = False
    try:
        yield Path(tmp)
        publish(tmp, path, mode)
        done = True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if not done:
            for folder in created:  # deepest first: a failed write leaves no empty folders either
                with contextlib.suppress(OSError):
                    folder.rmdir()


def publish(tmp: str | os.PathLike, path: str | os.PathLike, mode: int | None = None) -> None:
    """Renames the finished file ``tmp`` to ``path`` (same folder) in one step. The file gets
    ``mode``, by default the existing target's or else the umask's (``mkstemp`` creates 0600
    files); a target that became a directory, link or device meanwhile is refused."""
    path = check_output_path(path)  # still not a directory, link or device after the (long) write
    if mode is None:
        mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else _new_file_mode()
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    # Through a file object torch names the zip's root folder "archive", not after the
    # random temporary name: the same object gives the same bytes.
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)


def atomic_savez(path: str | os.PathLike, **arrays: Any) -> None:
    """``numpy.savez`` to ``path`` (no ``.npz`` is appended), atomically and reproducibly:
    the same arrays give the same bytes. Object arrays are refused (they would need pickle)."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", allowZip64=True) as archive:
        for name, value in arrays.items():
            array = np.asanyarray(value)
            if array.dtype.hasobject:
                raise InputError(f"array {name!r} holds Python objects; only numeric and string arrays are saved")
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def load_torch_file(path: str | os.PathLike, what: str) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only, so a
    crafted file cannot run code. ``InputError`` (naming ``what``) for anything else."""
    path = _as_path(path, what)
    if not path.is_file():
        raise InputError(f"no {what} at {path}" if not path.exists() else f"{what} {path} is not a regular file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message advises weights_only=False, i.e. running the file's code: not advice to pass on.
        named = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
        if named is None:
            raise InputError(f"{path} is not a readable {what}: not a torch file, or a corrupt one") from exc
        raise InputError(
            f"{path} is not a valid {what}: it references the Python object {named[1]}, and only tensors and "
            "plain containers are loaded (any other object could run code)"
        ) from exc
    except Exception as exc:  # a truncated or foreign file fails in many ways (zip, EOF, runtime errors)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "PytorchStreamReader" in reason:  # miniz's text goes on to blame torch itself
            reason = "not a torch zip archive (truncated, or another format)"
        raise InputError(f"{path} is not a readable {what}: {reason}") from exc


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """``path`` as a ``Path`` if it is, or can be created as, a writable directory."""
    path = _as_path(path, what)
    _check_writable(path.absolute(), f"{what} {path}")
    return path


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, what: str = "output folder") -> Iterator[Path]:
    """Creates the folder ``path`` (and missing parents) for the writes in the ``with``
    block; if the block fails, removes the folders it created, so no empty or partly
    filled output folder is left behind. A folder that existed before is kept."""
    path = check_output_dir(path, what)
    created = [folder for folder in (path.absolute(), *path.absolute().parents) if not folder.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {what} {path}: {exc.strerror}") from exc
    try:
        yield path
    except BaseException:
        if created:
            shutil.rmtree(created[-1], ignore_errors=True)
        raise
