"""`fedclip-cache`'s entry point (cli.main): what it adds around the typer app."""
import importlib
import io
import sys

import pytest

from fedclip_cache import cli


class PacifyFlushWrapper:
    """Stands for the copy of click's class that typer >= 0.26 carries (typer._click.utils), where it is not
    installed: a different class of the same name."""

    def __init__(self, wrapped):
        self.wrapped = wrapped


def wrappers():
    found = [PacifyFlushWrapper]
    for module in ("click.utils", "typer._click.utils"):
        try:
            found.append(importlib.import_module(module).PacifyFlushWrapper)
        except (ImportError, AttributeError):
            pass
    return found


@pytest.mark.parametrize("wrapper", wrappers(), ids=lambda w: w.__module__)
def test_a_closed_stdout_is_said_whichever_click_wrapped_it(wrapper, monkeypatch, capsys):
    """click ends a command whose stdout reader went away with exit 1 after swapping sys.stdout for its
    PacifyFlushWrapper; main says why on stderr whether that class is click's or typer's own copy of it."""
    def closed_pipe():
        sys.stdout = wrapper(io.StringIO())
        raise SystemExit(1)

    monkeypatch.setattr(sys, "stdout", sys.stdout)  # restored after the test
    monkeypatch.setattr(cli, "app", closed_pipe)
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 1
    assert "standard output was closed" in capsys.readouterr().err


def test_other_exits_say_nothing(monkeypatch, capsys):
    def failed():
        raise SystemExit(1)

    monkeypatch.setattr(cli, "app", failed)
    with pytest.raises(SystemExit):
        cli.main()
    assert capsys.readouterr().err == ""
