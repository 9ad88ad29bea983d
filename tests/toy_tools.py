"""Helpers for the tests that run mmseg's own tools on the bundled toy dataset."""
import os
import subprocess
import sys
from pathlib import Path

import mmseg

REPO = Path(__file__).resolve().parents[1]
TOOLS = Path(mmseg.__file__).parent / '.mim' / 'tools'
TOY_CONFIG = REPO / 'configs' / 'segman' / 'segman-t_1xb8-300i_toy-96x96.py'


def run(*args, cwd, env=None, timeout=600):
    """Run ``args`` with this interpreter; return ``(exit code, stdout + stderr)``."""
    result = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True,
                            text=True, timeout=timeout,
                            env={**os.environ, 'PYTHONWARNINGS': 'ignore', **(env or {})})
    return result.returncode, result.stdout + result.stderr


def make_toy_data(root: Path) -> Path:
    """A small toy dataset (8 train / 4 val images of 64x64) at ``root``."""
    code, out = run(REPO / 'tools' / 'make_toy_dataset.py', root, '--train', '8', '--val', '4',
                    '--size', '64', cwd=REPO)
    assert code == 0, out
    return root


def data_root_options(root) -> list:
    """``--cfg-options`` pointing the toy config's dataloaders at ``root``."""
    return [f'{split}_dataloader.dataset.data_root={root}' for split in ('train', 'val', 'test')]
