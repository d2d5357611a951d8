"""The one exception type that means "the user gave us something wrong", and the output-path check that
turns an unwritable destination into one, before any work is done."""

from __future__ import annotations

import errno
import os
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

QUIET_INTERRUPT = "SCALEGPT_QUIET_INTERRUPT"
"""Set in the environment of the ranks `scalegpt launch` starts: on Ctrl-C they stay silent, and the
launch process says "interrupted" once for all of them."""


class UserError(Exception):
    """Bad input (config, path, prompt, checkpoint). The CLI prints `scalegpt: error: <message>` and
    exits 2 with no traceback; the message says what is wrong and what to do."""


class SharedUserError(UserError):
    """A UserError that every rank raises together; only rank 0 prints it."""


def check_writable_dir(path: str | Path, what: str) -> None:
    """Raise a UserError unless the directory `path` exists or could be made there, and takes new files.

    Checked up front, so that an output that cannot be written fails in a second with its name, not
    after a long job with an OSError. It leaves nothing behind: the probe is a temporary folder in the
    nearest existing ancestor, removed at once (a permission check alone would pass for root under /proc).
    """
    p = Path(path).expanduser().absolute()
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what} {path} cannot be made: {existing} is a file, not a directory; choose another path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".scalegpt-write-check-", dir=existing))
    except OSError as exc:
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
        where = "it" if existing == p else f"it under {existing}"
        raise UserError(
            f"{what} {path} cannot be written: cannot create {where} ({reason}); choose a writable path"
        ) from exc


def check_writable_file(path: str | Path, what: str) -> None:
    """Raise a UserError unless a file could be written at `path`: not a directory, in a writable folder."""
    if Path(path).is_dir():
        raise UserError(f"{what} {path} is a directory; give a file name")
    check_writable_dir(Path(path).parent, f"{what} {path}: folder")


_FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("No space left on device", "Disk quota exceeded")


_NEARLY_FULL = 1 << 20
"""Bytes free below which a failed write under a folder is put down to a full device."""


def is_disk_full(exc: BaseException, where: str | Path | None = None) -> bool:
    """Whether `exc` (or an exception it was raised from) says the device or a quota ran out of space, or
    the device of `where` has (almost) no space left. The last is for torch.save, whose zip writer reports
    a short write as "unexpected pos" without the OS's reason; safetensors quotes the OS's words."""
    if where is not None:
        folder = Path(where)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            st = os.statvfs(folder)
            if st.f_bavail * st.f_frsize < _NEARLY_FULL:
                return True
        except OSError:
            pass
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FULL:
            return True
        if not isinstance(seen, OSError) and any(t in str(seen) for t in _FULL_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextmanager
def disk_full_is_a_user_error(where: str | Path, what: str) -> Iterator[None]:
    """Turn running out of space while writing under `where` into one line that names it. The writer's own
    temporary names and renames keep what existed; this only says what happened and what to do. Any other
    error passes through unchanged."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        if not is_disk_full(exc, where):
            raise
        raise UserError(
            f"no space left on the device of {where} while writing {what}; free space there (or choose another "
            f"path) and run the command again"
        ) from exc


class Terminated(BaseException):
    """SIGTERM during a command that writes (prepare, export): a BaseException, like KeyboardInterrupt, so
    that no `except Exception` on the way swallows it and every `finally` and `with` cleans up."""


def _terminate(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise Terminated


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block SIGTERM raises Terminated (in the main thread), as Ctrl-C raises KeyboardInterrupt."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
