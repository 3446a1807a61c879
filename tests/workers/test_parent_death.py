"""A child of the supervisor dies with the supervisor's process, not with the thread that started
it (trio starts processes from its thread pool, whose idle threads end after 10 s)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import psutil

PARENT = textwrap.dedent(
    """
    import subprocess, sys, threading
    CHILD = (
        "import os, sys, time\\n"
        "from modelmora_workers.process import die_with_parent\\n"
        "die_with_parent(int(sys.argv[1]))\\n"
        "print('armed', flush=True)\\n"
        "time.sleep(600)\\n"
    )
    box = {}

    def spawn():
        box["p"] = subprocess.Popen([sys.executable, "-c", CHILD, str(os.getpid())], stdout=subprocess.PIPE, text=True)
        assert box["p"].stdout.readline().strip() == "armed"  # it set up its watch while this thread ran

    import os
    t = threading.Thread(target=spawn)
    t.start()
    t.join()  # then the thread that started the child ends, as an idle pool thread does
    child = box["p"]
    import time
    time.sleep(0.5)  # a death signal tied to that thread would have arrived by now
    print(child.pid, flush=True)
    assert sys.stdin.readline().strip() == "alive?"
    print("yes" if child.poll() is None else "no", flush=True)
    sys.stdin.readline()  # then the parent exits
    """
)


def test_a_child_outlives_the_thread_that_started_it_and_dies_with_its_parent() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as parent:
        assert parent.stdin is not None and parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        parent.stdin.write("alive?\n")
        parent.stdin.flush()
        assert parent.stdout.readline().strip() == "yes"  # the starting thread's end did not kill it
        parent.stdin.write("bye\n")
        parent.stdin.flush()
        assert parent.wait(30) == 0
    child.wait(30)  # raises TimeoutExpired if it outlived its parent
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
