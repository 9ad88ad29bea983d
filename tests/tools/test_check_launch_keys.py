"""tools/gpu_checks/check_launch_keys.py: the launch keys a new input size meets, on the CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / 'tools' / 'gpu_checks' / 'check_launch_keys.py'


def test_after_a_480_warmup_new_sizes_compile_nothing(tmp_path):
    """The 480x480 warm-up of ``check_many_shapes.py`` meets unaligned stage-3 and -4 maps and
    512x512 aligned ones: every kernel taking ``ALIGN`` has its other alignment compiled at
    its first launch, and no size-dependent int is specialised, so neither 512x512 nor
    512x544 (nor the warm-up's own size) needs a compilation (docs/benchmarks.md, seventeenth
    session: the 1x1 kernel's pixel count was specialised on 16 and compiled again)."""
    pytest.importorskip('triton')
    out = tmp_path / 'keys.jsonl'
    done = subprocess.run([sys.executable, str(TOOL), '--models', 'segman-t', '--warmup', '480x480',
                           '--shapes', '480x480', '512x512', '512x544', '--out', str(out)],
                          env=dict(os.environ, TRITON_INTERPRET='1'), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row['shape'] for row in rows] == ['480x480', '512x512', '512x544']
    assert [row['new_keys'] for row in rows] == [0, 0, 0], [row['kernels'] for row in rows]


def test_refuses_to_run_without_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    done = subprocess.run([sys.executable, str(TOOL)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and 'TRITON_INTERPRET=1' in done.stderr
