"""Temporary folders of ``deploy``, ``simulate`` and ``site`` (its SuperExec secret) that a killed run (``kill -9``,
the OOM killer) could not remove: each run's folder holds an ``owner`` file naming its process (PID and start time:
a PID alone may be reused), and the next run of the same command removes the folders whose owner is gone."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

OWNER_FILE = "owner"


def process_start(pid: int) -> str:
    """The start time of process ``pid`` (clock ticks after boot; '' without procfs): with the PID, it names one
    process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


def owner_alive(text: str) -> bool:
    """Whether the process an owner file names (``PID [START]``) still runs; unreadable text or someone else's
    process count as alive (left alone)."""
    try:
        pid, *start = text.split()
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (ValueError, OSError):
        return True
    now = process_start(int(pid))
    return not (start and now and start[0] != now)


def make_owned(prefix: str) -> Path:
    """A new private temporary folder (``mkdtemp``: 0700) owned by this process."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        (d / OWNER_FILE).write_text(f"{os.getpid()} {process_start(os.getpid())}")
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    return d


def sweep_stale(prefix: str, root: Optional[Path] = None, unowned_after: Optional[float] = None) -> list[Path]:
    """Remove this user's folders ``root/prefix*`` whose owner process is gone; a folder without an owner file stays
    (one being made, or kept on purpose) unless ``unowned_after`` seconds old. Returns the removed folders."""
    gone = []
    for d in Path(root or tempfile.gettempdir()).glob(prefix + "*"):
        try:
            if not d.is_dir() or d.is_symlink() or d.stat().st_uid != os.getuid():
                continue
            try:
                alive = owner_alive((d / OWNER_FILE).read_text())
            except OSError:
                alive = unowned_after is None or time.time() - d.stat().st_mtime < unowned_after
            if not alive:
                shutil.rmtree(d, ignore_errors=True)
                gone.append(d)
        except OSError:
            continue
    return gone
