"""tools/gpu_checks/warm_triton_cache.py: a compiling job does not outlive the process that
started it (killed by a ``timeout``, it left jobs compiling beside the next measurement)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / 'tools' / 'gpu_checks'
CHILD = (f'import sys, time; sys.path.insert(0, {str(TOOLS)!r}); '
         'from warm_triton_cache import die_with_parent; die_with_parent(); '
         'print("ready", flush=True); time.sleep(120)')
PARENT = ('import subprocess, sys, time; '
          f'child = subprocess.Popen([sys.executable, "-c", {CHILD!r}], stdout=subprocess.PIPE, text=True); '
          'child.stdout.readline(); print(child.pid, flush=True); time.sleep(120)')


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f'/proc/{pid}/stat') as stat:  # a zombie has exited
        return stat.read().split(')')[-1].split()[0] != 'Z'


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='PR_SET_PDEATHSIG is Linux only')
def test_a_job_dies_with_its_parent():
    parent = subprocess.Popen([sys.executable, '-c', PARENT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive
