"""The one exception type that means "the user gave us something wrong", and the output-path check that
turns an unwritable destination into one, before any work is done."""

from __future__ import annotations

import errno
import os
import tempfile
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
