"""The ServerApp's progress lines, and how ``deploy`` reads them back from the ServerApp's log.

The ServerApp logs one tagged line per step (:func:`start` ... :func:`finetune_done`); ``deploy``
(``launch.flwr_cli.follow_run``) follows the log and reads each line with :func:`parse` to time the start-up, echo
the rounds and see the end of the run (``[SUMMARY]``, the final evaluation). Printer and parser share the tags
below, so neither can change alone. Imports nothing of Flower.
"""
from __future__ import annotations

import re
from typing import NamedTuple, Optional

START = "START"  # the ServerApp runs and waits for the nodes
NODES = "NODES"  # the nodes it waited for are connected
SETUP = "SETUP"  # every site answered the set-up message
ROUND = "ROUND"  # round n aggregated (its line: "[ROUND n]")
SUMMARY = "SUMMARY"  # the final evaluation is in: the run folder follows
FINETUNE = "FINETUNE"  # --finetune-steps: the sites' fine-tuned scores are in

_LINE = re.compile(rf"\[({START}|{NODES}|{SETUP}|{ROUND} (\d+)|{SUMMARY}|{FINETUNE})\] ?(.*)")


class Event(NamedTuple):
    """One progress line: its tag (one of the constants above), the round (``ROUND`` only) and the text after the
    tag."""

    tag: str
    round: Optional[int]
    text: str

    @property
    def label(self) -> str:
        """How ``deploy`` names the step: "round 3", "summary", "setup", ..."""
        return f"round {self.round}" if self.tag == ROUND else self.tag.lower()


def _tagged(tag: str, text: str) -> str:
    return f"[{tag}] {text}"


def start(n_nodes: int) -> str:
    return _tagged(START, f"waiting for {n_nodes} node(s)")


def nodes(n_nodes: int, seconds: float) -> str:
    return _tagged(NODES, f"{n_nodes} connected after {seconds:.2f} s")


def setup(sites: list[str]) -> str:
    return _tagged(SETUP, f"{len(sites)} site(s): {', '.join(sorted(sites))}")


def round_done(rnd: int, rounds: int, replies: int, reply_s: float, aggregate_s: float) -> str:
    """Message ``rnd`` of ``rounds`` + 1 answered: ``[ROUND rnd]``, or ``[SUMMARY]`` for the final evaluation."""
    tag = f"{ROUND} {rnd}" if rnd <= rounds else SUMMARY
    return _tagged(tag, f"{replies} replies in {reply_s:.3f} s, aggregated in {aggregate_s:.3f} s")


def finetune_done(replies: int, seconds: float) -> str:
    return _tagged(FINETUNE, f"{replies} replies in {seconds:.3f} s")


def parse(line: str) -> Optional[Event]:
    """The progress line in ``line`` (a log line: Flower's prefix before the tag is skipped), or None."""
    m = _LINE.search(line)
    if m is None:
        return None
    tag = ROUND if m.group(2) is not None else m.group(1)
    return Event(tag, int(m.group(2)) if m.group(2) is not None else None, m.group(3).strip())
