"""flower/logproto.py: every progress line the ServerApp prints is read back by the parser ``deploy`` uses."""
from fedclip_cache.flower import logproto

FLOWER_PREFIX = "\x1b[92mINFO \x1b[0m:      "  # what flwr's logger puts before a message


def test_what_the_server_prints_the_parser_reads():
    lines = [
        (logproto.start(3), logproto.START, None, "waiting for 3 node(s)"),
        (logproto.nodes(3, 1.234), logproto.NODES, None, "3 connected after 1.23 s"),
        (logproto.setup(["sketch", "art", "photo"]), logproto.SETUP, None, "3 site(s): art, photo, sketch"),
        (logproto.round_done(2, 5, 3, 0.5, 0.01), logproto.ROUND, 2, "3 replies in 0.500 s, aggregated in 0.010 s"),
        (logproto.round_done(6, 5, 3, 0.5, 0.01), logproto.SUMMARY, None,
         "3 replies in 0.500 s, aggregated in 0.010 s"),
        (logproto.finetune_done(2, 0.25), logproto.FINETUNE, None, "2 replies in 0.250 s"),
    ]
    for text, tag, rnd, rest in lines:
        event = logproto.parse(FLOWER_PREFIX + text + "\n")
        assert event == (tag, rnd, rest), text
    assert logproto.parse(logproto.round_done(12, 20, 1, 0, 0)).label == "round 12"
    assert logproto.parse(logproto.round_done(21, 20, 1, 0, 0)).label == "summary"


def test_the_lines_keep_their_published_form():
    """The run's own log (RUN/logs/serverapp.log) is read by people and scripts: the tags stay as they were."""
    assert logproto.round_done(2, 5, 3, 0.5, 0.01) == "[ROUND 2] 3 replies in 0.500 s, aggregated in 0.010 s"
    assert logproto.round_done(6, 5, 3, 0.5, 0.01).startswith("[SUMMARY] ")
    assert logproto.setup(["b", "a"]) == "[SETUP] 2 site(s): a, b"
    assert logproto.finetune_done(3, 1.0) == "[FINETUNE] 3 replies in 1.000 s"


def test_other_lines_are_not_progress():
    for line in ("INFO :      Successfully started run 42", "[ROUND x] nothing", "round 3 done", ""):
        assert logproto.parse(line) is None, line
