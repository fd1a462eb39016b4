"""launch/procs.py: signal scopes, secret files and ports shared by deploy, simulate and site."""
import os
import signal
import socket
import stat

import pytest

from fedclip_cache.launch import procs


@pytest.fixture
def sentinel_sigterm():
    """A SIGTERM handler of the caller's, restored after the test."""
    def handler(*_):
        raise AssertionError("the caller's handler ran")

    before = signal.signal(signal.SIGTERM, handler)
    yield handler
    signal.signal(signal.SIGTERM, before)


def test_sigterm_inside_the_scope_is_a_keyboard_interrupt_and_the_handler_comes_back(sentinel_sigterm):
    with pytest.raises(KeyboardInterrupt):
        with procs.sigterm_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):  # the handler runs between bytecodes
                pass
    assert signal.getsignal(signal.SIGTERM) is sentinel_sigterm


def test_signals_are_ignored_during_a_clean_up_and_restored_after(sentinel_sigterm):
    intr_before = signal.getsignal(signal.SIGINT)
    with procs.sigterm_interrupts():
        with procs.signals_ignored():
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)  # ignored: nothing raised
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGTERM) is procs.raise_interrupt
    assert signal.getsignal(signal.SIGTERM) is sentinel_sigterm
    assert signal.getsignal(signal.SIGINT) is intr_before


def test_a_secret_file_is_private_fresh_and_never_overwritten(tmp_path):
    path = tmp_path / "secret"
    secret = procs.write_secret(path)
    assert path.read_bytes() == secret and len(secret) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert procs.write_secret(tmp_path / "other") != secret
    with pytest.raises(FileExistsError):
        procs.write_secret(path)
    assert path.read_bytes() == secret


def test_a_free_port_is_closed_until_something_listens_on_it():
    port = procs.free_port()
    assert not procs.port_open(port)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert procs.port_open(port)
