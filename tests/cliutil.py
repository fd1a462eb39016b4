"""The CLI run in-process as a user runs it, and the shape every refusal must have (one line, exit 2): shared by
the test modules that drive ``fedclip-cache`` through its real entry point."""
import sys

from fedclip_cache.cli import main


def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run the real entry point (with its error handling) in-process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["fedclip-cache", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, out: str, err: str, *fragments: str) -> str:
    """The refusal's message, after checking it is one line on stderr, exit 2, no traceback, holding ``fragments``."""
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    msg = err.strip()
    assert msg.startswith("error:") and "\n" not in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg
