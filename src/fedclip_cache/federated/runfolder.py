"""Run folders as trustworthy as caches: one writer at a time, a state marker written last, one kind per folder.

Every folder that ``federate -o``, ``sweep -o``, ``run`` (the pipeline's ``out``) and ``deploy -o`` / ``simulate
-o`` (the ServerApp's ``out``) write holds ``state.json``::

    {"kind": "federate" | "sweep" | "deploy" | "pipeline", "state": "in-progress" | "complete",
     "started": ..., "finished": ..., "files": {"summary.json": {"bytes": ..., "sha256": ...}, ...}}

It is the run folder's commit record, as ``cache.json`` is a cache's. A run claims its folder (:func:`claim`)
before it writes anything: it takes the folder's lock (an ``flock`` on the folder itself, the cache writer's
mechanism, ``integrity.WriterLock``: released by the kernel when the process dies; ``.lock`` says who holds it), a
folder of another kind is refused, ``state.json`` becomes ``in-progress`` and an earlier run's outputs are removed
(the folder is rewritten in place, not written beside and renamed: a deployment's ServerApp, another process and on
a real deployment another machine, writes into the path it is given, and ``deploy``'s ``logs/`` live in the same
folder; a half-written folder is marked in-progress, which every reader checks, exactly as an extract does with its
cache). A sweep is resumable, so its finished points are kept. Only when every output is written does
``state.json`` become ``complete``, with the size and sha256 of each output: ``report`` renders only a complete
folder whose files are those it lists (a file rewritten afterwards, e.g. by an older fedclip-cache, is a *mixed*
folder, refused).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from ..errors import ConfigError, FedclipCacheError
from ..cache.integrity import WriterLock, describe_holder, writer_active
from ..cache.store import display_text, file_sha256, is_disk_full, write_json

STATE_FILE = "state.json"
KINDS = ("federate", "sweep", "deploy", "pipeline")
# What `federate` and a deployment's ServerApp write; listed with their checksums when the run completes
RUN_OUTPUTS = ("config.json", "metrics.parquet", "adapter.pt", "summary.json")
# Files of an earlier run that a new run of the same kind removes at its start (only these names: never the
# user's own files, never a deployment's logs/, which deploy clears itself)
_EARLIER = {"federate": RUN_OUTPUTS + ("plots/accuracy_vs_round.png",),
            "deploy": RUN_OUTPUTS + ("plots/accuracy_vs_round.png", "simulation.json"),
            "pipeline": ("pipeline.json",), "sweep": ()}
# The names a run of each kind writes in its folder (beside .lock, the holder note): in a folder holding none of
# ours, a file of one of these names is the user's, never overwritten (a sweep overwrote one's summary.md and
# state.json, federate one's plots/accuracy_vs_round.png)
_RUN_PLOT = "plots/accuracy_vs_round.png"
_FOLDERS = ("points",)  # of those names, the folders
_OWN = {"federate": RUN_OUTPUTS + (STATE_FILE, _RUN_PLOT),
        "deploy": RUN_OUTPUTS + ("simulation.json", STATE_FILE, _RUN_PLOT),
        "sweep": ("sweep.json", "points", "results.parquet", "summary.md", "summary.csv", STATE_FILE,
                  "plots/accuracy_vs_params.png", _RUN_PLOT, "plots/communication_vs_accuracy.png"),
        "pipeline": ("pipeline.json", STATE_FILE)}
_WHAT = {"federate": "a federate run folder", "sweep": "a sweep folder", "deploy": "a deploy/simulate run folder",
         "pipeline": "a pipeline (`run`) output folder", "cache": "a feature cache"}


_DEPLOY_LOGS = ("deploy.json", "serverapp.log", "superlink.log", "flwr-run.log", ".deploy.lock")


class RunFolderError(ConfigError):
    """A run folder that is busy, of another kind, incomplete or mixed; the message says what to do."""


class DiskFull(FedclipCacheError, OSError):
    """The disk filled up while a run folder was written."""


class RunLock(WriterLock):
    """The cache writer's lock (``integrity.WriterLock``), worded for a run folder."""

    def __init__(self, folder: Path, kind: str, label: str):
        super().__init__(folder)
        self.kind, self.label = kind, label

    def busy(self, holder: dict) -> Exception:
        return RunFolderError(f"{self.label} {self.cache}: the folder is in use by another {holder.get('kind', 'run')}"
                              f" ({describe_holder(holder)}); wait for it to finish or give another folder")

    def unwritable(self, e: OSError) -> Exception:
        if e.errno == errno.ENAMETOOLONG:
            longest = max(len(os.fsencode(part)) for part in self.cache.parts)
            return RunFolderError(f"{self.label} {_short(self.cache)}: the path is too long for the file system "
                                  f"(its longest name has {longest} bytes, most allow 255; the whole path "
                                  f"{len(os.fsencode(str(self.cache.absolute())))}); give a shorter name")
        return RunFolderError(f"{self.label} {_short(self.cache)}: cannot create or write the folder "
                              f"({e.strerror or e}); give a writable folder")

    def holder_extra(self) -> dict:
        return {"kind": self.kind}

    def start(self) -> None:
        """Mark the folder in-progress and remove an earlier run's outputs: from here on it is this run's."""
        with disk_full(self.cache):
            write_state(self.cache, self.kind, "in-progress")
            for name in _EARLIER[self.kind]:
                (self.cache / name).unlink(missing_ok=True)

    def complete(self, files: Iterable[str] = ()) -> None:
        mark_complete(self.cache, self.kind, files)


def _short(p: Path) -> str:
    s = str(p)
    return s if len(s) <= 120 else s[:60] + "…" + s[-40:]


def claim(folder, kind: str, label: str, check: Optional[Callable[[], None]] = None,
          start: bool = True) -> RunLock:
    """Lock ``folder`` for a run of ``kind`` (refused in one line while another run holds it, or when the folder
    is of another kind), mark it in-progress and remove an earlier run's outputs (``start=False``: only when the
    run calls ``.start()``, so that a run refused after the lock was taken, e.g. by federate's memory or prompt
    checks, which need the loaded cache, leaves the earlier run as it was). ``label`` (``federate -o``)
    words the errors; ``check`` (a sweep: is this the folder's sweep?) runs under the lock before anything is
    changed, so a refusal leaves the folder as it was. Release with ``.close()``; ``.complete(files)`` marks the
    run done."""
    assert kind in KINDS, kind
    folder = Path(folder)
    _check_utf8(folder, label)
    lock = RunLock(folder, kind, label)
    try:  # (a too-long name fails already here: Path.exists raises ENAMETOOLONG)
        check_not_a_file(folder, label)
        _check_kind(folder, kind, label)  # first without the lock: taking it writes .lock (a cache has its own)
    except OSError as e:
        raise lock.unwritable(e) from None
    lock.__enter__()
    try:
        _check_kind(folder, kind, label)  # again, now that no other run can change the folder
        if check is not None:
            check()
        if start:
            lock.start()
    except BaseException:
        lock.close()
        raise
    return lock


def check_not_a_file(folder: Path, label: str) -> None:
    """A one-line error when ``folder``, or a folder above it, is a file (the run failed only at its first write)."""
    folder = Path(folder)
    for p in (folder, *folder.parents):
        if p.exists() and not p.is_dir():
            raise RunFolderError(f"{label} {_short(folder)}: {_short(p)} is a file, not a folder; give another folder")


def _check_utf8(folder: Path, label: str) -> None:
    """A name that is not UTF-8 (Python holds its bytes as surrogates) is refused before anything is created: pyarrow
    cannot open metrics.parquet there (UnicodeEncodeError, a traceback after the whole run had trained) and the
    run's JSON records could not name it."""
    shown = display_text(str(folder))  # the store's one rule: it changes exactly the names that are not UTF-8
    if shown != str(folder):
        raise RunFolderError(f"{label} {_short(Path(shown))}: the name is not valid UTF-8 (pyarrow cannot write "
                             f"there); give a UTF-8 name")


def _refuse_other_kind(folder: Path, kind: str, label: str) -> Optional[str]:
    """The folder's kind (None: new, or none of ours); a folder of another kind is refused."""
    have = folder_kind(folder)
    if have is not None and have != kind:
        raise RunFolderError(f"{label} {folder}: this is {_WHAT[have]}, not {_WHAT[kind]}; give another folder "
                             f"(one kind of run per folder)")
    return have


def _check_kind(folder: Path, kind: str, label: str) -> None:
    have = _refuse_other_kind(folder, kind, label)
    # A file where a run writes a folder (plots/, points/) or a folder where it writes a file (summary.json):
    # refused now, before the lock; the run broke on it only at its end (a traceback after training).
    subs = sorted({str(Path(n).parent) for n in _OWN[kind]} - {"."})
    for name, want_dir in [(d, True) for d in subs] + [(n, n in _FOLDERS) for n in _OWN[kind]]:
        p = folder / name
        if p.exists() and p.is_dir() != want_dir:
            what = "a folder" if p.is_dir() else "a file"
            raise RunFolderError(f"{label} {folder}: {p} is {what} where the run writes its {name}"
                                 f"{'/ folder' if want_dir else ''}; remove or rename it, or give another folder")
    clash = [n for n in _OWN[kind] if have is None and (folder / n).exists()]
    if clash:  # a file of that name that is not ours: never overwritten or removed
        raise RunFolderError(f"{label} {folder}: holds a {clash[0]} that fedclip-cache did not write; give another "
                             f"folder (or an empty one)")


def folder_kind(folder: Path) -> Optional[str]:
    """What wrote ``folder``: its ``state.json``, else (folders written before it existed) the files it holds;
    None for a new or empty folder or one holding none of ours."""
    folder = Path(folder)
    state = read_state(folder)
    if state is not None and state.get("kind") in KINDS:
        return state["kind"]
    if (folder / "cache.json").is_file():
        return "cache"
    if (folder / "sweep.json").is_file():
        return "sweep"
    if (folder / "pipeline.json").is_file():
        return "pipeline"
    if (folder / "simulation.json").is_file() or any((folder / "logs" / n).exists() for n in _DEPLOY_LOGS):
        return "deploy"
    config = _json(folder / "config.json")
    if "federate" in config:  # (a config.json of one's own is not taken for ours)
        return "deploy" if config.get("deployment") else "federate"
    if "experiments" in _json(folder / "summary.json"):
        return "federate"
    return None


def _json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def read_state(folder: Path) -> Optional[dict]:
    try:
        state = json.loads((Path(folder) / STATE_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"kind": None, "state": "damaged"}
    return state if isinstance(state, dict) else {"kind": None, "state": "damaged"}


def write_state(folder: Path, kind: str, state: str, files: Optional[dict] = None) -> None:
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    old = read_state(folder) or {}
    rec = {"kind": kind, "state": state, "started": old.get("started", now) if state == "complete" else now}
    if state == "complete":
        rec.update(finished=now, files=files or {})
    write_json(Path(folder) / STATE_FILE, rec)


def begin(folder: Path, kind: str) -> None:
    """Mark a folder in-progress without a lock (a deployment's ServerApp, which may run on a machine where no
    ``fedclip-cache deploy`` holds the folder); a folder of another kind is refused."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _refuse_other_kind(folder, kind, "out")
    with disk_full(folder):
        write_state(folder, kind, "in-progress")


def mark_complete(folder: Path, kind: str, files: Iterable[str] = ()) -> None:
    """The last write of a run: ``state.json`` = complete, with each output's size and sha256."""
    folder = Path(folder)
    with disk_full(folder):
        listed = {n: {"bytes": (folder / n).stat().st_size, "sha256": file_sha256(folder / n)} for n in files}
        write_state(folder, kind, "complete", listed)


@contextlib.contextmanager
def disk_full(folder: Path, what: str = ""):
    """Turn a full disk (or quota) while writing into ``folder`` into one line naming the folder; the run stays
    marked in-progress. torch.save reports it as ``RuntimeError: ... unexpected pos 960 vs 854`` (its zip
    writer's check after a short write), pyarrow as an ``OSError`` without errno: both are recognised here."""
    try:
        yield
    except FedclipCacheError:
        raise
    except (OSError, RuntimeError) as e:
        name = f"{Path(folder) / what}" if what else str(folder)
        if is_disk_full(e) or (_torch_short_write(e) and _nearly_full(Path(folder))):
            raise DiskFull(f"disk full writing {name}: free space and re-run (the folder is left marked "
                           f"incomplete)") from None
        if _torch_short_write(e):  # a short write with room left: a quota, an I/O error, a vanished folder
            raise DiskFull(f"write failed writing {name} (torch: {str(e).splitlines()[0][-80:]}): check the disk "
                           f"(quota, I/O errors) and re-run (the folder is left marked incomplete)") from None
        raise


def _torch_short_write(e: BaseException) -> bool:
    """torch.save's zip writer reports a write that came up short as a RuntimeError, without errno."""
    return isinstance(e, RuntimeError) and ("unexpected pos" in str(e) or "file write failed" in str(e))


def _nearly_full(folder: Path) -> bool:
    import shutil

    for p in (folder, *folder.parents):
        try:
            return shutil.disk_usage(p).free < 64 << 20  # what is left after a short write: a few KB at most
        except OSError:
            continue
    return False


# ------------------------------------------------------------------------------------------------ readers

def check_readable(folder: Path, kind: str) -> list[str]:
    """Before ``report`` renders ``folder`` (a ``kind`` folder): a one-line error when it is being written, was left
    unfinished, or its files are not the ones its run completed with. Returns notes to print (a folder written
    before ``state.json`` existed cannot be checked: said loudly, rendered)."""
    folder = Path(folder)
    state = read_state(folder)
    if state is None:
        return [f"{folder} has no {STATE_FILE} (written by an older fedclip-cache): whether the run finished, and "
                f"whether every file is from the same run, cannot be checked"]
    if state.get("state") == "damaged":
        raise RunFolderError(f"{folder / STATE_FILE}: damaged; re-run the command that wrote {folder}")
    if state.get("kind") != kind:
        raise RunFolderError(f"{folder}: {STATE_FILE} says {_WHAT.get(state.get('kind'), 'another kind of folder')}"
                             f", but it holds {_WHAT[kind]}'s files: a mixed folder; re-run into a new folder")
    holder = writer_active(folder)
    if state.get("state") != "complete":
        if holder:
            raise RunFolderError(f"{folder}: a {holder.get('kind', 'run')} is writing this folder now "
                                 f"({describe_holder(holder)}); report it when it has finished")
        raise RunFolderError(f"{folder}: incomplete run folder (the {kind} that was writing it stopped before "
                             f"finishing: killed, failed or disk full); re-run the same command")
    # complete, and a run holds the folder: one that has not started writing yet (federate trains first)
    notes = [f"a {holder.get('kind', 'run')} is running on {folder} now ({describe_holder(holder)}): shown is the "
             f"run that completed before it, which that run will replace"] if holder else []
    for name, rec in (state.get("files") or {}).items():
        f = folder / name
        if not f.is_file():
            raise RunFolderError(f"{folder}: {name} is missing (listed in {STATE_FILE}); re-run the same command")
        if f.stat().st_size != rec.get("bytes") or file_sha256(f) != rec.get("sha256"):
            raise RunFolderError(f"{folder}: mixed run folder: {name} is not the file this run completed with "
                                 f"(rewritten since {state.get('finished')}); re-run into a new folder")
    return notes
