"""launch/flwr_cli.follow_run reads the ServerApp's own progress lines (printed by flower/logproto.py)."""
import time

import pytest

from fedclip_cache.flower import logproto
from fedclip_cache.launch.flwr_cli import follow_run


class NothingDied:
    logs = "logs"

    def dead(self):
        return []


def test_follow_run_times_the_start_up_echoes_the_rounds_and_ends_at_the_summary(tmp_path, monkeypatch):
    pytest.importorskip("flwr")
    log = tmp_path / "serverapp.log"
    prefix = "INFO :      "
    log.write_text("".join(prefix + line + "\n" for line in (
        logproto.start(2), logproto.nodes(2, 0.5), logproto.setup(["b", "a"]),
        logproto.round_done(1, 2, 2, 0.1, 0.0), logproto.round_done(2, 2, 2, 0.1, 0.0),
        logproto.round_done(3, 2, 2, 0.1, 0.0))))
    said, asked, timings = [], [], {}

    def status(run_id):
        asked.append(run_id)
        return "finished:completed"

    now = time.monotonic()
    run_id = follow_run(None, log, NothingDied(), said.append, 60, now, timings=timings, t0=now, status=status,
                        run_id="7")
    assert run_id == "7" and asked == ["7"]  # asked once: after [SUMMARY], not before
    assert set(timings) == {"serverapp_s", "nodes_s", "startup_s"}
    assert said[0].startswith("set-up done (") and said[0].endswith("): 2 site(s): a, b")
    assert [s.split(" (")[0] for s in said[1:]] == ["round 1", "round 2", "summary"]
