"""flwr 1.42's SuperNode Runtime API, called inside the site process instead of over local HTTP.

A site (launch/site.py) runs its SuperNode and its ClientApp worker in one process. Flower's worker protocol is a
dozen HTTP requests per message to the SuperNode's Runtime API on 127.0.0.1 (acquire the task, pull its input,
the message and its objects, confirm, push the reply and its objects, push the task's output, heartbeats), each
carrying the 2 MB adapter through HTTP, protobuf and the GIL of both ends of the same process: 0.1-0.15 s per
round on a 2-core machine. :class:`DirectRuntime` answers the same calls by calling the very functions the
SuperNode's HTTP router calls (``flwr.supernode.servicer.runtime.runtime_handlers``, the shared core handlers for
the task heartbeat), with the same task-token authentication, on the SuperNode's own ``NodeState``. Requests and
responses are the same protobuf messages; the SuperNode <-> SuperLink protocol is untouched. The HTTP Runtime API
stays up (flwr's own ``flwr-clientapp`` and ``flower-superexec`` would use it).
"""
from __future__ import annotations


def _task_call(handler: str, shared: bool = False):
    """A Runtime API call authenticated by the task token: ``handler(request, state, task)`` of the SuperNode's
    runtime handlers (``shared``: the core handlers every component shares, e.g. the task heartbeat)."""
    def call(self, request):
        return getattr(self._core if shared else self._node, handler)(request, self.state, self._task())

    call.__name__ = handler
    return call


class DirectRuntime:
    """The ``RuntimeHttpClient`` methods a ClientApp task uses, on ``state`` (the SuperNode's NodeState).
    ``token``: the task's token (every call but ``AcquireTask`` is authenticated with it, as over HTTP)."""

    def __init__(self, state, token: str | None = None):
        from .flwr_internals import runtime_handlers

        handlers = runtime_handlers()
        self.state, self.token, self._core, self._node = state, token, handlers.core, handlers.node

    def _task(self):
        from flwr.supercore.error import ApiErrorCode, FlowerError

        task = self.state.get_task_by_token(self.token) if self.token else None
        if task is None:  # as flwr.supercore.dependencies.task.authenticate_task
            raise FlowerError(ApiErrorCode.RUNTIME_AUTHENTICATION_FAILED, "Runtime task-token authentication failed.")
        return task

    def AcquireTask(self, request):  # guarded by the SuperExec secret over HTTP; nothing to guard in-process
        return self._node.acquire_task(request, self.state)

    SendTaskHeartbeat = _task_call("send_task_heartbeat", shared=True)
    PullTaskInput = _task_call("pull_task_input")
    PullMessages = _task_call("pull_messages")
    PullObject = _task_call("pull_object")
    ConfirmMessageReceived = _task_call("confirm_message_received")
    PushMessages = _task_call("push_messages")
    PushObject = _task_call("push_object")
    PushTaskOutput = _task_call("push_task_output")

    def close(self) -> None:
        pass
