"""tools/gpu_checks/check_host_time.py: the operation count of ``--ops --backward``, and that
``--ops``' layers run (its timings are measurements, not tested)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / 'tools' / 'gpu_checks'))
from check_host_time import backward_node  # noqa: E402


def test_operations_a_node_counts_what_the_nodes_call_not_their_parts():
    # the backward of x * 2 calls one mul (whose own parts are not counted); the pass adds
    # three over the chain: its seed (ones_like), the final sum's expand, the leaf's detach
    once = backward_node(lambda x: x * 2.0, 'cpu', chain=10, repeats=1)
    twice = backward_node(lambda x: x * 2.0 * 3.0, 'cpu', chain=10, repeats=1)
    assert (once['operations_a_node'], twice['operations_a_node']) == (1.3, 2.3)
    assert once['backward_us_a_node'] > 0


def test_every_op_layer_runs_on_the_cpu():
    """``--ops --cpu``'s layers each run once (under Triton's interpreter, kernels not
    launched, in a subprocess: the variable must be set before triton is imported), so the
    tool follows the ops' signatures (a stale call of the layer norm's launch broke it)."""
    pytest.importorskip('triton')
    script = (
        'import torch\n'
        'from check_host_time import op_layers\n'
        'from mmseg_segman.ops.triton_jit import kernels_not_launched\n'
        'with kernels_not_launched():\n'
        '    for grad in (False, True):\n'
        '        for name, fn in op_layers(grad, "cpu").items():\n'
        '            fn()\n'
        'print("ran", len(op_layers(False, "cpu")))\n')
    tools = Path(__file__).resolve().parents[2] / 'tools' / 'gpu_checks'
    env = dict(os.environ, TRITON_INTERPRET='1')
    done = subprocess.run([sys.executable, '-c', script], cwd=tools, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'ran ' in done.stdout
