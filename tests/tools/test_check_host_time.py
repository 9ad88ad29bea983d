"""tools/gpu_checks/check_host_time.py: the operation count of ``--ops --backward`` (its
timings are measurements, not tested)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / 'tools' / 'gpu_checks'))
from check_host_time import backward_node  # noqa: E402


def test_operations_a_node_counts_what_the_nodes_call_not_their_parts():
    # the backward of x * 2 calls one mul (whose own parts are not counted); the pass adds
    # three over the chain: its seed (ones_like), the final sum's expand, the leaf's detach
    once = backward_node(lambda x: x * 2.0, 'cpu', chain=10, repeats=1)
    twice = backward_node(lambda x: x * 2.0 * 3.0, 'cpu', chain=10, repeats=1)
    assert (once['operations_a_node'], twice['operations_a_node']) == (1.3, 2.3)
    assert once['backward_us_a_node'] > 0
