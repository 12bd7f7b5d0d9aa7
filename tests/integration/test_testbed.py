"""The network testbed (chaos/testbed.py) on this machine's kernel: hosts in their own
network namespaces reach each other over a bridge; a link cut isolates one host until it
heals; a drop loses one direction's packets silently (the sender sees no error, as on a
lossy link); and `down` leaves no namespace, link,
process or state file behind, after a clean run, after a run killed midway, and when
called again."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from chaos import testbed
from chaos.testbed import Testbed
from tests.support import needs_netns

pytestmark = pytest.mark.integration


# A one-datagram receiver: prints what arrives within a second.
RECV = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], 9999)); s.settimeout(float(sys.argv[2]))
    print("ready", flush=True)
    try:
        print(s.recv(100).decode(), flush=True)
    except socket.timeout:
        print("nothing", flush=True)
    """
)
# A TCP connect: how it ends within a second.
CONNECT = textwrap.dedent(
    """
    import errno, socket, sys
    try:
        socket.create_connection((sys.argv[1], 9), timeout=1.0)
        print("connected")
    except socket.timeout:
        print("timeout")
    except OSError as e:
        print(errno.errorcode.get(e.errno, e.errno))
    """
)
SEND = "import socket, sys; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'hi', (sys.argv[1], 9999))"  # noqa: E501


def datagram_arrives(tb: Testbed, src, dst) -> bool:
    recv = tb.run(
        dst, [sys.executable, "-c", RECV, dst.address, "1.5"], stdout=subprocess.PIPE, text=True
    )
    assert recv.stdout.readline().strip() == "ready"
    tb.run(src, [sys.executable, "-c", SEND, dst.address]).wait(timeout=10)
    return recv.communicate(timeout=10)[0].strip() == "hi"


def connect(tb: Testbed, src, dst) -> str:
    run = tb.run(
        src, [sys.executable, "-c", CONNECT, dst.address], stdout=subprocess.PIPE, text=True
    )
    return run.communicate(timeout=10)[0].strip()


@needs_netns
def test_hosts_reach_each_other_and_faults_cut_what_they_should(state_dir):
    tb = Testbed("t1", ["head", "prefill-0", "decode-0"], "10.231.7.0/29")
    try:
        head, prefill, decode = tb.up()
        assert tb.state.exists() and tb.state.parent == state_dir
        assert {h.address for h in tb.hosts} == {"10.231.7.1", "10.231.7.2", "10.231.7.3"}
        reach = lambda a, b: datagram_arrives(tb, a, b)  # noqa: E731
        assert reach(head, prefill) and reach(prefill, decode) and reach(decode, head)
        tb.set_link(prefill, False)  # isolated: nobody reaches it, the others still talk
        assert not reach(head, prefill) and not reach(prefill, decode)
        assert reach(head, decode)
        tb.set_link(prefill, True)
        assert reach(head, prefill)
        assert connect(tb, prefill, decode) == "ECONNREFUSED"  # nothing listens on port 9
        tb.drop(prefill, decode)  # one way: prefill -> decode dropped, not the reverse
        assert not datagram_arrives(tb, prefill, decode)
        assert datagram_arrives(tb, decode, prefill)
        assert connect(tb, prefill, decode) == "timeout"  # silence, not a local error
        tb.drop(prefill, decode, on=False)
        assert datagram_arrives(tb, prefill, decode)
        assert connect(tb, prefill, decode) == "ECONNREFUSED"
    finally:
        tb.down()
    assert not [n for n in testbed.leftovers() if n.startswith(tb.prefix)]
    assert not tb.state.exists()


@needs_netns
def test_down_after_a_run_killed_midway_leaves_nothing(state_dir):
    """A run that made its testbed and started processes inside is SIGKILLed; `down`
    (as `pdcluster testbed down` runs it) removes its namespaces and their processes;
    a second `down` is a no-op. A testbed made only in part goes the same way."""
    script = textwrap.dedent(
        f"""
        import subprocess, time
        from chaos import testbed
        from pathlib import Path
        testbed.STATE_DIR = Path({str(state_dir)!r})
        tb = testbed.Testbed("t2", ["a", "b"], "10.231.8.0/29")
        for h in tb.up():
            tb.run(h, ["sleep", "300"])
        for h in tb.hosts:  # `ip netns exec` has entered the namespace
            while not subprocess.run(["ip", "netns", "pids", h.netns], capture_output=True).stdout:
                time.sleep(0.01)
        print("up", flush=True)
        time.sleep(300)
        """
    )
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    tb = Testbed("t2", ["a", "b"], "10.231.8.0/29")
    try:
        _killed_midway(run, tb)
    finally:
        run.kill()
        tb.down()
    assert not [n for n in testbed.leftovers() if n.startswith(tb.prefix)]


def _killed_midway(run: subprocess.Popen, tb: Testbed) -> None:
    assert run.stdout.readline().strip() == "up"
    made = [n for n in testbed.leftovers() if n.startswith("pdtb-t2-")]
    assert len(made) == 3  # the bridge's namespace and one per host
    sleepers = [
        int(p) for ns in made for p in subprocess.run(
            ["ip", "netns", "pids", ns], capture_output=True, text=True
        ).stdout.split()
    ]  # fmt: skip
    assert len(sleepers) == 2
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=10)
    tb.down()
    assert not [n for n in testbed.leftovers() if n.startswith(tb.prefix)]
    assert not tb.state.exists()
    time.sleep(0.2)
    for pid in sleepers:
        status = subprocess.run(
            ["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True
        )
        assert status.stdout.strip() in ("", "Z"), (pid, status.stdout)
    tb.down()  # again: nothing to do, no error
    # Made in part (a crash inside `up`): the same `down` removes what exists.
    subprocess.run(["ip", "netns", "add", tb.bridge_ns], check=True)
    subprocess.run(["ip", "netns", "add", tb.hosts[0].netns], check=True)
    tb.down()
    assert not [n for n in testbed.leftovers() if n.startswith(tb.prefix)]


def test_a_testbed_takes_only_a_private_range_that_fits():
    with pytest.raises(ValueError, match="private"):
        Testbed("t3", ["a"], "8.8.8.0/29")
    with pytest.raises(ValueError, match="fit"):
        Testbed("t3", ["a", "b", "c", "d", "e", "f", "g"], "10.231.9.0/29")
