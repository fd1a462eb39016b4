"""flower/flwr_internals.py: every flwr internal a deployment relies on exists in the installed flwr, and one
that disappears is named in one line."""
import importlib

import pytest

pytest.importorskip("flwr")

from fedclip_cache.flower import flwr_internals as fi  # noqa: E402


def test_every_flwr_internal_fedclip_cache_uses_is_there():
    """Each name of INTERNALS resolves and takes the keyword arguments passed to it (a newer flwr that drops one
    fails here, naming it, instead of in a deployment)."""
    assert fi.missing() == [], (f"flwr {fi.installed_version()} (checked: {fi.FLWR_CHECKED}) changed what "
                                f"fedclip-cache relies on:\n" + "\n".join(fi.missing()))


def test_a_vanished_internal_is_named_with_its_user():
    gone = fi.Internal(fi.SUPERNODE_LOOP, "_no_such_function", "launch/site.py")
    renamed_kw = fi.Internal(fi.INFLATABLE, "pull_objects", "launch/site.py", ("initial_backoff", "no_such_kw"))
    no_module = fi.Internal("flwr.no_such_module", "x", "launch/zygote.py")
    problems = fi.missing((gone, renamed_kw, no_module))
    assert len(problems) == 3
    assert problems[0].startswith(f"{fi.SUPERNODE_LOOP}._no_such_function is gone") and "launch/site.py" in problems[0]
    assert problems[1] == f"{fi.INFLATABLE}.pull_objects takes no no_such_kw any more (used by launch/site.py)"
    assert problems[2].startswith("flwr.no_such_module.x is gone (ModuleNotFoundError")
    with pytest.raises(RuntimeError, match=r"_no_such_function is gone .*checked against flwr 1\.42\.0, installed"):
        fi.require(fi.SUPERNODE_LOOP, "_no_such_function")


def test_fleet_gate_passes_flwrs_fleet_router_prefix():
    from fedclip_cache.launch.fleet_gate import FLEET_PATHS

    assert FLEET_PATHS == fi.fleet_api_prefix() + "/"


def test_supernode_loop_patch_wraps_the_pull_and_replaces_the_sleeps(monkeypatch):
    loop = importlib.import_module(fi.SUPERNODE_LOOP)
    calls = []

    def pull(*args, **kw):  # stands in for flwr's: a message for run 7, then nothing
        calls.append(("pull", kw["state"]))
        return 7 if calls.count(("pull", "S")) == 1 else None

    for name in ("time", "pull_objects"):
        monkeypatch.setattr(loop, name, getattr(loop, name))  # restored after the test
    monkeypatch.setattr(loop, "_pull_and_store_message", pull)
    clock = object()
    fi.patch_supernode_loop(clock, lambda state: calls.append(("state", state)), lambda: calls.append("stored"),
                            0.05)
    assert loop.time is clock
    assert loop._pull_and_store_message(state="S") == 7 and loop._pull_and_store_message(state="S") is None
    assert calls == [("state", "S"), ("pull", "S"), "stored", ("state", "S"), ("pull", "S")]
    assert loop.pull_objects.keywords == {"initial_backoff": 0.05, "backoff_cap": 1.0}
