"""The processes of one local deployment (``deploy``): those it starts itself (:class:`Deployment`, each the
leader of its own process group) and those its zygote forks for it (:class:`Zygote`, :class:`ZygoteChild`: the
parent's side of zygote.py's protocol). :meth:`Deployment.stop` ends them all."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .flwr_cli import DeployError
from .procs import dies_with_us, group_alive


@dataclass
class Deployment:
    """The processes of one local deployment; :meth:`stop` ends them all (idempotent)."""

    env: dict
    logs: Path
    procs: list = field(default_factory=list)  # (name, Popen, log file)

    def start(self, name: str, cmd: list[str], env: Optional[dict] = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env={**self.env, **(env or {})},
                             start_new_session=True,  # its own process group: stop() reaches its children too
                             preexec_fn=dies_with_us())  # a kill -9 of deploy must not leave it running
        self.procs.append((name, p, log))
        return p

    def dead(self) -> list[str]:
        return [f"{n} (exit {p.returncode})" for n, p, _ in self.procs if p.poll() is not None]

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to every process group, SIGKILL to what is left after ``grace`` seconds (``grace=0``: SIGKILL at
        once); then reap. The zygote gets SIGKILL last: it reaps and reports the children it forked, then ends
        itself (killed first, it would leave them to init, which reaps slowly: ~2 s)."""
        for sig in (signal.SIGTERM, signal.SIGKILL) if grace > 0 else (signal.SIGKILL,):
            procs = [(n, p) for n, p, _ in reversed(self.procs)]
            if sig == signal.SIGKILL:
                procs = [x for x in procs if x[0] != "zygote"] + [x for x in procs if x[0] == "zygote"]
            alive = []
            for name, p in procs:
                if sig == signal.SIGKILL and name == "zygote":
                    try:  # it ends with its last child (SIGTERM is ignored by it: nothing else happens)
                        p.wait(timeout=2.0)
                    except subprocess.TimeoutExpired:
                        pass
                try:
                    os.killpg(p.pid, sig)  # the group: flower-superexec, flwr-clientapp/-serverapp under it
                    alive.append(p)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            for p in alive:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            if all(p.poll() is not None for p in alive) and not any(group_alive(p.pid) for p in alive):
                break
        deadline = time.monotonic() + max(grace, 5.0)  # killed group members are reaped by their parents or init
        while any(group_alive(p.pid) for _, p, _ in self.procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        for _, p, log in self.procs:
            p.poll()
            if log is not None:
                log.close()

    def pids(self) -> list[int]:
        return [p.pid for _, p, _ in self.procs]


class ZygoteChild:
    """A site or the ServerApp process, forked by the zygote (zygote.py): as much of ``subprocess.Popen``
    as :class:`Deployment` uses; its exit code comes from the zygote's report."""

    def __init__(self, zygote: "Zygote", name: str):
        self.zygote, self.name = zygote, name

    @property
    def pid(self) -> int:
        return self.zygote.pids[self.name]

    @property
    def returncode(self) -> Optional[int]:
        if self.name in self.zygote.exits:
            return self.zygote.exits[self.name]
        if self.zygote.proc.poll() is not None and self.zygote.done.is_set():  # no report will come
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return -1
        return None

    def poll(self) -> Optional[int]:
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.name, timeout)
            time.sleep(0.02)
        return self.returncode


class Zygote:
    """``python -m fedclip_cache.launch.zygote``, started before its specs are known (it imports meanwhile);
    :meth:`send` hands it the specs (then it forks), :meth:`abort` ends it before that. Reads its pid and exit
    reports."""

    def __init__(self, env: dict, early_log: Path):
        self.early = open(early_log, "ab")  # its stderr until send() names the run's log (no run folder yet)
        self.proc = subprocess.Popen([sys.executable, "-m", "fedclip_cache.launch.zygote"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.early, start_new_session=True,
                                     env={**env, "FEDCLIP_DEPLOY_PARENT": str(os.getpid())})  # dies with us
        self.pids: dict = {}
        self.exits: dict = {}
        self.done = threading.Event()
        self.children: list = []
        self.managed = False  # its children are in the Deployment's processes (started() returned)

    def abort(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # it has forked nothing yet: it waits for its specs
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.early.close()

    def send(self, dep: "Deployment", specs: list[dict], log: Path) -> None:
        self.proc.stdin.write(json.dumps({"log": str(log), "early_log": self.early.name, "specs": specs}).encode())
        self.proc.stdin.close()
        threading.Thread(target=self._read, daemon=True).start()
        dep.procs.append(("zygote", self.proc, self.early))
        self.children = [ZygoteChild(self, s["name"]) for s in specs]

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            (self.exits if "exit" in msg else self.pids)[msg["name"]] = msg.get("exit", msg.get("pid"))
        self.done.set()

    def started(self, dep: "Deployment", limit: float = 120) -> None:
        """Wait until every child is forked (the zygote imports torch first), then let ``dep`` manage them."""
        wait_until(lambda: len(self.pids) == len(self.children), dep, limit, "the zygote did not fork the sites")
        dep.procs.extend((c.name, c, None) for c in self.children)
        self.managed = True

    def kill(self) -> None:
        """SIGKILL now, while it is still forking (deploy interrupted or failed before :meth:`started` returned):
        its children are not the Deployment's yet, so SIGTERM reaches none of them, and the zygote (which ignores
        SIGTERM and ends with its last child) would keep ``stop`` waiting its whole grace period. Each child it
        forked dies with it (PR_SET_PDEATHSIG, set before the child does anything else)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_until(ready: Callable[[], bool], dep: Deployment, limit: float, what: str) -> None:
    """Poll ``ready`` every 0.2 s; a :class:`DeployError` saying ``what`` when one of ``dep``'s processes exited
    meanwhile or ``limit`` seconds passed."""
    deadline = time.monotonic() + limit
    while not ready():
        if dep.dead():
            raise DeployError(f"{what}: {', '.join(dep.dead())} exited (logs: {dep.logs})")
        if time.monotonic() > deadline:
            raise DeployError(f"{what} within {limit:.0f} s (logs: {dep.logs})")
        time.sleep(0.2)
