"""Run a test module's checks in Triton's CPU interpreter.

``TRITON_INTERPRET=1`` must be set before Triton is imported, so the module runs as a script
in a subprocess (the rest of the suite never sees the variable) and prints
'all checks passed' at the end.
"""
import os
import subprocess
import sys


def assert_checks_pass_in_interpreter(path: str, timeout: int) -> None:
    result = subprocess.run([sys.executable, path], capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, 'TRITON_INTERPRET': '1'})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert 'all checks passed' in result.stdout, result.stdout[-4000:]
