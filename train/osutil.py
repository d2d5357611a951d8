"""Standard-library helpers that train/ and launch/ share: atomic writes and a free TCP port.

This module imports nothing heavy (no torch), so the launcher can use it and still start in half a second.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary name beside `path`; on success rename it over `path`, on any error remove it.

    A reader never sees half a file, and a failed or interrupted write leaves the previous file as it was.
    The temporary name starts with a dot, so globs over the folder do not pick it up.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes to `path` atomically."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: Any, *, indent: int = 2) -> None:
    """Write `obj` as JSON to `path` atomically, with a final newline."""
    atomic_write(path, json.dumps(obj, indent=indent) + "\n")


def free_port() -> int:
    """A TCP port nobody listens on now, so two jobs on one machine never share a rendezvous port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_taken(port: int) -> bool:
    """Whether something on this machine already listens on TCP `port` (a socket left in TIME_WAIT by an
    earlier job does not count: the rendezvous server reuses the address as this probe does)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False
