"""When to ask again: the poll schedule of the ServerApp (``replies yet?``) and of a site's SuperNode (``a message
for me?``) in a deployment.

Flower 1.42's transport is polling: the ServerApp asks the SuperLink for replies, a SuperNode asks it for messages.
Polling slowly adds up to one poll interval of latency per hop and round; polling fast all the time costs CPU that
the sites' training needs (on a small machine they share the cores). In a federated run the wait is regular: a
round's replies come about as long after its message as last round's did, and a site's next message comes about as
long after its reply as last time. :class:`PollPlan` uses that: it sleeps through the part of the wait in which
nothing came in the recent rounds, polls every ``FAST_POLL`` seconds around the recent arrival times, and backs
off (``FIRST_POLL``, 1.5x per poll, up to ``cap``) before anything is known and once the wait is longer than any
recent one. The protocol and what is asked are unchanged: only the pauses between two asks.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Optional

FIRST_POLL = 0.01  # the first wait of a back-off (each next one 1.5x longer, up to the cap)
FAST_POLL = 0.015  # the wait between two polls while an arrival is due
LEAD = 0.25  # the fast window opens this fraction of the earliest recent wait before it (at most MAX_LEAD seconds)
MAX_LEAD = 0.25
HISTORY = 5  # recent waits remembered


class PollPlan:
    """Pauses between polls for one kind of wait. :meth:`start` when the wait begins (a message was sent, a reply
    pushed), :meth:`pause` before each next poll (seconds to sleep), :meth:`arrived` when it ended."""

    def __init__(self, cap: float):
        self.cap = cap
        self.recent: deque = deque(maxlen=HISTORY)
        self.t0: Optional[float] = None
        self.delay = FIRST_POLL

    def start(self) -> None:
        self.t0, self.delay = time.monotonic(), FIRST_POLL

    @property
    def waiting(self) -> bool:
        return self.t0 is not None

    def arrived(self) -> None:
        """The awaited thing came: remember how long the wait since :meth:`start` was (nothing without a start)."""
        if self.t0 is not None:
            self.recent.append(time.monotonic() - self.t0)
        self.t0, self.delay = None, FIRST_POLL

    def pause(self) -> float:
        """Seconds to sleep before the next poll (outside a started wait: the back-off alone)."""
        elapsed = None if self.t0 is None else time.monotonic() - self.t0
        if self.recent and elapsed is not None:
            lo, hi = min(self.recent), max(self.recent)
            lead = min(LEAD * lo, MAX_LEAD)
            if elapsed < lo - lead:  # nothing came this early lately: sleep until the window opens
                return max(min(lo - lead - elapsed, self.cap), FIRST_POLL)
            if elapsed <= hi + lead:
                return FAST_POLL
        wait = self.delay  # nothing known, or later than lately: back off
        self.delay = min(self.delay * 1.5, self.cap)
        return min(wait, self.cap)
