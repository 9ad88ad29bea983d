"""tools/analysis_tools/saved_for_backward.py: the meta device counts what the CPU keeps."""
import subprocess
import sys
from pathlib import Path

from mmseg_segman.ops import use_backends

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / 'tools' / 'analysis_tools'))
from saved_for_backward import saved_bytes  # noqa: E402


def test_meta_count_equals_the_cpu_count_of_the_reference_path():
    with use_backends('torch'):
        on_cpu = saved_bytes('t', 1, 64, 96, 'cpu')
    on_meta = saved_bytes('t', 1, 64, 96, 'meta')
    assert on_cpu > 0 and abs(on_meta - on_cpu) <= 1e-3 * on_cpu  # within a few KiB of 42 MB
    # activations grow about linearly with the batch (weights are saved once)
    two, three = (saved_bytes('t', batch, 64, 96, 'meta') for batch in (2, 3))
    assert two > on_meta and abs((three - two) - (two - on_meta)) <= 0.03 * (two - on_meta)


def test_command_prints_one_json_line():
    result = subprocess.run([sys.executable, 'tools/analysis_tools/saved_for_backward.py', '--arch', 's',
                             '--batch', '2', '--size', '128', '128'], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"saved_gib"' in result.stdout.strip().splitlines()[-1]
