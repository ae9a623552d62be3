"""tools/dev.py, the developer entry point: its help needs nothing installed, and the demo
stops moto and the extension when it is stopped, however it is stopped."""

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, free_port, wait_for

DEV = ROOT / "tools" / "dev.py"


@pytest.mark.parametrize("args", [["--help"], ["help"], ["demo", "--help"], ["demo", "-h"]])
def test_help_prints_usage_and_exits_0(args):
    done = subprocess.run([sys.executable, str(DEV), *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(("Developer entry point", "usage: python3 tools/dev.py demo"))


@pytest.mark.parametrize("args", [["fuzz", "--examples"], ["fuzz", "--examples", "many"], ["fuzz", "-x"]])
def test_fuzz_with_a_wrong_argument_says_how_and_exits_2(args):
    # Checked before the venv: no package index needed to be told.
    done = subprocess.run([sys.executable, str(DEV), *args], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stderr) == (2, "usage: python3 tools/dev.py fuzz [--examples N]\n")


def test_the_help_names_every_command():
    done = subprocess.run([sys.executable, str(DEV), "--help"], capture_output=True, text=True, timeout=30)
    for command in ("demo", "test", "fuzz [--examples N]", "bench"):
        assert f"python3 tools/dev.py {command}" in done.stdout, command


def test_an_unknown_command_exits_2():
    done = subprocess.run([sys.executable, str(DEV), "frobnicate"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "[dev] unknown command 'frobnicate'" in done.stderr


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(child) for child in children.read().split()]


def _gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie is gone too
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_the_demo_stops_moto_and_the_extension_when_it_is_stopped(sig):
    # The demo runs from the venv; were its pins stamp not this Python's, dev.py would
    # rebuild the venv under the running tests: only run where it would not.
    stamp = ROOT / ".venv" / ".requirements.sha256"
    wanted = hashlib.sha256((ROOT / "requirements-dev.txt").read_bytes() + sys.version.encode()).hexdigest()
    if not stamp.exists() or stamp.read_text() != wanted:
        pytest.skip("the dev venv was not built by this Python")
    port = free_port()
    demo = subprocess.Popen([sys.executable, str(DEV), "demo"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, PARAMETERS_SECRETS_EXTENSION_HTTP_PORT=str(port)))
    try:
        deadline = time.monotonic() + 60
        for line in demo.stdout:
            if "try it yourself" in line or time.monotonic() > deadline:
                break
        children = _children(demo.pid)
        assert len(children) == 2, children  # moto and the extension
        demo.send_signal(sig)
        assert demo.wait(20) == 0
        wait_for(lambda: all(_gone(child) for child in children), timeout=10,
                 message="moto and the extension to be stopped")
        with socket.socket() as probe:  # nothing listens on the extension's port any more
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no listener
            probe.bind(("127.0.0.1", port))
            probe.listen(1)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
