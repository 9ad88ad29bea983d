"""train -> resume -> test through mmseg's own tools on the bundled toy dataset."""
import os
import re
import subprocess
import sys
from pathlib import Path

import mmseg
import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = Path(mmseg.__file__).parent / '.mim' / 'tools'
CONFIG = REPO / 'configs' / 'segman' / 'segman-t_1xb8-300i_toy-96x96.py'


def run(*args, cwd):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True,
                            text=True, timeout=600, env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    return result.returncode, result.stdout + result.stderr


def data_options(root):
    return [f'{split}_dataloader.dataset.data_root={root}' for split in ('train', 'val', 'test')]


@pytest.fixture(scope='module')
def toy_data(tmp_path_factory):
    root = tmp_path_factory.mktemp('toy')
    code, out = run(REPO / 'tools' / 'make_toy_dataset.py', root, '--train', '8', '--val', '4',
                    '--size', '64', cwd=REPO)
    assert code == 0, out
    return root


def test_train_resume_test(tmp_path, toy_data):
    work = tmp_path / 'work'
    short = ['train_dataloader.batch_size=2', 'train_cfg.val_interval=2',
             'default_hooks.checkpoint.interval=2', 'default_hooks.logger.interval=1',
             'model.data_preprocessor.size=[64,64]', *data_options(toy_data)]
    code, out = run(TOOLS / 'train.py', CONFIG, '--work-dir', work, '--cfg-options',
                    'train_cfg.max_iters=2', *short, cwd=REPO)
    assert code == 0, out[-3000:]
    assert re.search(r'mIoU: \d', out), out[-3000:]
    assert (work / 'iter_2.pth').is_file()

    code, out = run(TOOLS / 'train.py', CONFIG, '--work-dir', work, '--resume', '--cfg-options',
                    'train_cfg.max_iters=4', *short, cwd=REPO)
    assert code == 0, out[-3000:]
    assert 'resumed epoch: 0, iter: 2' in out, out[-3000:]
    assert 'Iter(train) [3/4]' in out and (work / 'iter_4.pth').is_file()

    code, out = run(TOOLS / 'test.py', CONFIG, work / 'iter_4.pth', '--work-dir', tmp_path / 'test',
                    '--show-dir', 'overlays', '--cfg-options', *data_options(toy_data), cwd=REPO)
    assert code == 0, out[-3000:]
    assert re.search(r'mIoU: \d', out), out[-3000:]
    overlays = list((tmp_path / 'test').rglob('overlays/*.png'))
    assert len(overlays) == 4


def test_missing_data_directory_is_named(tmp_path):
    code, out = run(TOOLS / 'train.py', CONFIG, '--work-dir', tmp_path / 'work', '--cfg-options',
                    *data_options(tmp_path / 'no_such_data'), cwd=REPO)
    assert code != 0
    assert 'No such file or directory' in out and 'no_such_data' in out
