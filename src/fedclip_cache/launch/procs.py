"""What every process ``deploy``, ``simulate`` and ``site`` start on this machine shares: temporary folders that a
killed run leaves behind, free ports, secret files, children that die with their parent, and the signal handling
around a run and its clean-up. Standard library only (the zygote imports it before anything else).

Temporary folders: a killed run (``kill -9``, the OOM killer) cannot remove its folder, so each run's folder holds
an ``owner`` file naming its process (PID and start time: a PID alone may be reused), and the next run of the same
command removes the folders whose owner is gone (:func:`sweep_stale`).
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

OWNER_FILE = "owner"

# ------------------------------------------------------------------------------------------ temporary folders


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


def write_secret(path: Path, nbytes: int = 32) -> bytes:
    """A fresh random secret in a new 0600 file ``path`` (refused if it exists; put it under a 0700 folder);
    returns the secret."""
    secret = secrets.token_bytes(nbytes)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secret)
    finally:
        os.close(fd)
    return secret


# ------------------------------------------------------------------------------------------ ports


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts connections on ``host:port`` (0.2 s at most)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


# ------------------------------------------------------------------------------------------ process lifetime


def _libc_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# looked up once, before any fork: die_with_parent runs in a freshly forked child (Popen's preexec_fn)
_PRCTL = _libc_prctl()
CAN_DIE_WITH_PARENT = _PRCTL is not None  # Linux's PR_SET_PDEATHSIG; elsewhere a child outlives a killed parent


def die_with_parent(parent: int) -> None:
    """Linux: this process gets SIGKILL when its parent ``parent`` ends (``deploy`` killed with SIGKILL cannot stop
    what it started: its zygote, the zygote's children and ``flwr run`` would run on, orphaned). Async-signal-safe
    enough for ``Popen(preexec_fn=...)``: libc's prctl is looked up before the fork."""
    if _PRCTL is None:
        return
    _PRCTL(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it ended before the prctl
        os.kill(os.getpid(), signal.SIGKILL)


def dies_with_us() -> Optional[Callable[[], None]]:
    """A ``preexec_fn``: the child gets SIGKILL when this process ends (Linux; elsewhere None)."""
    if not CAN_DIE_WITH_PARENT:
        return None
    me = os.getpid()
    return lambda: die_with_parent(me)


def group_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` is still there (zombies included)."""
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


# ------------------------------------------------------------------------------------------ signals


def raise_interrupt(*_) -> None:
    """A signal handler: the signal ends the run as Ctrl-C does (a KeyboardInterrupt, so every ``finally`` runs)."""
    raise KeyboardInterrupt


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # only there may Python set signal handlers


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt inside the block (the run's clean-up runs, as after Ctrl-C); the handler it
    replaced comes back at the end. Off the main thread: nothing changes."""
    if not _on_main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)


@contextmanager
def signals_ignored() -> Iterator[None]:
    """SIGTERM and SIGINT are ignored inside the block: a second Ctrl-C/SIGTERM must not cut a clean-up short. Off
    the main thread: nothing changes."""
    if not _on_main_thread():
        yield
        return
    term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    intr = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, intr if intr is not None else signal.SIG_DFL)
        signal.signal(signal.SIGTERM, term if term is not None else signal.SIG_DFL)
