"""train -> resume -> test through mmseg's own tools on the bundled toy dataset.

The tools import the plugin only through the config's ``custom_imports``, and reading the
checkpoints back (resume, test) needs the weights-only allow-list ``import mmseg_segman``
installs, so this is the end-to-end check of both.
"""
import re

import pytest

from .toy_tools import REPO, TOOLS, TOY_CONFIG, data_root_options, make_toy_data, run


@pytest.fixture(scope='module')
def toy_data(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp('toy'))


def test_train_resume_test(tmp_path, toy_data):
    work = tmp_path / 'work'
    short = ['train_dataloader.batch_size=2', 'train_cfg.val_interval=2',
             'default_hooks.checkpoint.interval=2', 'default_hooks.logger.interval=1',
             'model.data_preprocessor.size=[64,64]', *data_root_options(toy_data)]
    code, out = run(TOOLS / 'train.py', TOY_CONFIG, '--work-dir', work, '--cfg-options',
                    'train_cfg.max_iters=2', *short, cwd=REPO)
    assert code == 0, out[-3000:]
    assert re.search(r'mIoU: \d', out), out[-3000:]
    assert (work / 'iter_2.pth').is_file()

    code, out = run(TOOLS / 'train.py', TOY_CONFIG, '--work-dir', work, '--resume', '--cfg-options',
                    'train_cfg.max_iters=4', *short, cwd=REPO)
    assert code == 0, out[-3000:]
    assert 'resumed epoch: 0, iter: 2' in out, out[-3000:]
    assert 'Iter(train) [1/4]' not in out and 'Iter(train) [3/4]' in out, out[-3000:]
    assert (work / 'iter_4.pth').is_file()

    code, out = run(TOOLS / 'test.py', TOY_CONFIG, work / 'iter_4.pth', '--work-dir', tmp_path / 'test',
                    '--show-dir', tmp_path / 'overlays', '--cfg-options',
                    'default_hooks.visualization.interval=1', *data_root_options(toy_data), cwd=REPO)
    assert code == 0, out[-3000:]
    assert re.search(r'mIoU: \d', out), out[-3000:]
    assert len(list((tmp_path / 'overlays').rglob('*.png'))) == 4  # one per validation image


def test_missing_data_directory_is_named(tmp_path):
    code, out = run(TOOLS / 'train.py', TOY_CONFIG, '--work-dir', tmp_path / 'work', '--cfg-options',
                    *data_root_options(tmp_path / 'no_such_data'), cwd=REPO)
    assert code != 0
    assert 'No such file or directory' in out and 'no_such_data' in out, out[-3000:]
