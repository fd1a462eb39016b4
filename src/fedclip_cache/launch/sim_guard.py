"""The watcher of one ``fedclip-cache simulate`` run: when the simulate process dies without cleaning up (``kill -9``,
the OOM killer, a job scheduler's SIGKILL), it kills every process of that run's Ray instance and removes the run's
temporary folder.

Why it is needed: Ray's own kernel fate-sharing (``PR_SET_PDEATHSIG``) kills the processes the driver started
(``gcs_server``, ``raylet``, dashboard, monitors) when the driver dies, but the raylet's children, the
DashboardAgent and the RuntimeEnvAgent, then try to report the raylet's unexpected death to the (dead) GCS and wait
up to 60 s for it; and nothing of Ray's removes the session folder.

How: ``simulate`` starts this script (stdlib only, run by path with ``python -I``) just before Ray starts, in a
session of its own (the terminal's Ctrl-C and a kill of simulate's process group do not reach it), with a pipe on
its stdin, and marks the run's processes by an environment variable (``FEDCLIP_SIM_RUN=<temporary folder>``, set
before ``ray.init``: every Ray process inherits it). The script waits for the end of its stdin -- simulate closes
the pipe when it returns, or the kernel does when simulate dies -- then SIGKILLs every process (but simulate) that
was started with that mark (``/proc/PID/environ``) or holds a file in the folder open (``/proc/PID/fd``: Ray's logs),
and removes the folder unless simulate wrote ``keep`` (a failed run whose Ray logs the error message names).
"""
import os
import shutil
import signal
import sys
import time

MARK = "FEDCLIP_SIM_RUN"
KEEP = b"keep"


def marked(token: str, folder: str, owner: int) -> list:
    """PIDs of the live processes of the run: started with ``MARK=token`` in their environment, or holding a file
    under ``folder`` open (a Ray process's logs). Both are needed: Ray's Python processes rename themselves
    (``ray::DashboardAgent``) with setproctitle, which overwrites what ``/proc/PID/environ`` shows. Zombies (their
    environ and fds read empty) are not listed, nor is the simulate process ``owner`` (its Ray driver log is in the
    folder: when it closed the pipe, it cleaned up and goes on or exits by itself)."""
    if not token or not folder or not os.path.isabs(folder) or os.path.normpath(folder) == "/":
        # an empty folder would match every process with an open file, an empty token every unmarked one: the
        # caller kills what this returns, so a bad argument must never widen it to the whole machine
        raise ValueError(f"marked() needs a token and an absolute run folder, got {token!r} and {folder!r}")
    want, under = f"{MARK}={token}".encode(), os.path.join(folder, "")
    skip, found = {os.getpid(), owner}, []
    try:
        names = os.listdir("/proc")
    except OSError:  # no procfs (not Linux): nothing to find
        return found
    for name in names:
        if not name.isdigit() or int(name) in skip:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if want in f.read().split(b"\0"):
                    found.append(int(name))
                    continue
            fds = f"/proc/{name}/fd"
            for fd in os.listdir(fds):
                try:
                    if os.readlink(f"{fds}/{fd}").startswith(under):
                        found.append(int(name))
                        break
                except OSError:
                    pass
        except OSError:  # gone meanwhile, or not ours
            pass
    return found


def reap(token: str, folder: str, owner: int, timeout: float = 10.0) -> bool:
    """SIGKILL the run's processes until none is left (one may start another meanwhile); False on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        pids = marked(token, folder, owner)
        if not pids:
            return True
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def main(argv: list) -> int:
    token, folder, owner = argv[1], argv[2], os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a stray Ctrl-C must not leave the run unwatched
    said = b""
    try:
        while True:  # until EOF: simulate closed the pipe (it returned) or died
            chunk = os.read(0, 64)
            if not chunk:
                break
            said += chunk
    except OSError:
        pass
    reap(token, folder, owner)
    if not said.startswith(KEEP):
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
