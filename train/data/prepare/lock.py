"""data.dir's lock and the scratch folder of one `scalegpt prepare` run."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from ...errors import UserError

SCRATCH_PREFIX = ".prepare-tmp-"


class Scratch:
    """Holds data.dir's lock and a scratch folder inside it for one prepare run. On exit the scratch
    folder (every temporary file is in it) and the lock go; so do the folders this run created, when
    they are left empty, so bad input leaves no trace. Scratch folders of runs that were killed (kill -9
    leaves no chance to clean up) are found once the lock is held, which proves their runs are gone:
    their finished token files may be taken over (resume.adopt), and the folders go on exit too."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.created = [p for p in (data_dir, *data_dir.parents) if not p.exists()]
        data_dir.mkdir(parents=True, exist_ok=True)
        self.lock_path = data_dir / ".prepare.lock"
        self.lock = open(self.lock_path, "a")  # held until __exit__
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self.lock.close()
            raise UserError(
                f"another `scalegpt prepare` is writing {data_dir}; wait for it to finish (run prepare once, "
                f"not on every rank)"
            ) from exc
        self.path = data_dir / f"{SCRATCH_PREFIX}{os.getpid()}"
        self.leftovers = sorted(p for p in data_dir.glob(f"{SCRATCH_PREFIX}*") if p.is_dir() and p != self.path)
        self.path.mkdir(exist_ok=True)

    @property
    def lock_fd(self) -> int:
        return self.lock.fileno()

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        for folder in (self.path, *self.leftovers):
            shutil.rmtree(folder, ignore_errors=True)
        self.lock_path.unlink(missing_ok=True)
        self.lock.close()
        for folder in self.created:  # deepest first
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
