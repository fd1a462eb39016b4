"""The parts of a deployment's transport that are ours: the poll schedule (flower.polls.PollPlan), the in-process
Runtime API of a site (flower.runtime.DirectRuntime) and the ServerApp process's log flush (launch.serverapp).
End to end they are exercised by every real deployment in tests/launch/test_deploy.py (whose results equal
federate's)."""
import queue
import threading
import time

import pytest

pytest.importorskip("flwr")

from fedclip_cache.flower import polls as flower_polls  # noqa: E402
from fedclip_cache.flower.polls import FAST_POLL, FIRST_POLL, PollPlan  # noqa: E402


class Clock:
    def __init__(self):
        self.now = 100.0

    def monotonic(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(flower_polls.time, "monotonic", c.monotonic)
    return c


def test_poll_plan_backs_off_until_something_is_known(clock):
    plan = PollPlan(cap=0.2)
    plan.start()
    waits = [plan.pause() for _ in range(12)]
    assert waits[0] == FIRST_POLL and waits[1] == pytest.approx(1.5 * FIRST_POLL)
    assert max(waits) == 0.2 and waits == sorted(waits)
    # outside a started wait (a site before its first message): the back-off alone, nothing recorded
    idle = PollPlan(cap=0.2)
    assert idle.pause() == FIRST_POLL
    idle.arrived()
    assert len(idle.recent) == 0


def test_poll_plan_sleeps_through_the_quiet_part_and_polls_fast_when_an_arrival_is_due(clock):
    plan = PollPlan(cap=0.2)
    for wait in (0.50, 0.55, 0.52):  # three rounds whose replies came 0.50-0.55 s after the message
        plan.start()
        clock.now += wait
        plan.arrived()
    assert list(plan.recent) == pytest.approx([0.50, 0.55, 0.52])
    plan.start()
    lead = min(flower_polls.LEAD * 0.50, flower_polls.MAX_LEAD)  # the window opens at 0.5 - lead
    assert plan.pause() == 0.2  # nothing came this early lately: a long sleep (at most the cap)
    clock.now += 0.3
    assert plan.pause() == pytest.approx(0.50 - lead - 0.3)  # ... up to the window, not into it
    clock.now += 0.50 - lead - 0.3
    for t in (0.0, 0.1, 0.2):  # inside [min - lead, max + lead]: every FAST_POLL seconds
        assert plan.pause() == FAST_POLL
        clock.now += 0.05
    clock.now = plan.t0 + 0.55 + lead / 2  # a little later than the latest recent arrival: still fast
    assert plan.pause() == FAST_POLL
    clock.now = plan.t0 + 0.55 + lead + 0.01  # later than any recent arrival: back off again from FIRST_POLL
    assert [plan.pause() for _ in range(3)] == pytest.approx([FIRST_POLL, 1.5 * FIRST_POLL, 2.25 * FIRST_POLL])
    plan.arrived()  # the slow round is remembered too; the oldest ones drop out after HISTORY rounds
    assert max(plan.recent) == pytest.approx(0.55 + lead + 0.01)
    for _ in range(flower_polls.HISTORY):
        plan.start()
        clock.now += 0.4
        plan.arrived()
    assert list(plan.recent) == pytest.approx([0.4] * flower_polls.HISTORY)


def test_direct_runtime_authenticates_tasks_as_the_http_runtime_api():
    from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullTaskInputRequest, PushTaskOutputRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.error import FlowerError
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate import NodeStateFactory

    from fedclip_cache.flower.runtime import DirectRuntime

    state = NodeStateFactory(ObjectStoreFactory()).state()
    res = DirectRuntime(state).AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    assert not res.HasField("task") and not res.token  # nothing pending
    for token in (None, "", "not-a-token"):
        for call, req in (("PullTaskInput", PullTaskInputRequest()), ("PushTaskOutput", PushTaskOutputRequest())):
            with pytest.raises(FlowerError, match="authentication failed"):
                getattr(DirectRuntime(state, token), call)(req)


def test_serverapp_log_flush_waits_for_the_queue_not_a_fixed_second():
    import sys

    from fedclip_cache.launch.serverapp import install_quick_flush, quick_flush_logs

    install_quick_flush()
    assert sys.modules["flwr.superlink.runtime.run_serverapp"].flush_logs is quick_flush_logs
    q = queue.Queue()
    for i in range(3):
        q.put(f"line {i}")

    def upload():  # flwr's uploader takes everything from the queue every upload interval
        time.sleep(0.1)
        while not q.empty():
            q.get_nowait()

    threading.Thread(target=upload).start()
    t = time.monotonic()
    assert quick_flush_logs(q) is True
    assert 0.1 <= time.monotonic() - t < 0.6  # flwr 1.42's own: the wait for the queue, then 1 s more
    q.put("stuck")  # nobody takes it: gives up after the timeout, says so
    t = time.monotonic()
    assert quick_flush_logs(q, timeout=0.2) is False
    assert time.monotonic() - t < 0.6
