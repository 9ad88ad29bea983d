"""Fine-tuning from a checkpoint of another class count (configs/segman/segman-t-ade20k-pre_*):
mmengine's runner loads all but the classifier; mmseg's test.py refuses that checkpoint.

The runner runs in a subprocess, which leaves this process's default scope as it was."""
import json
import re

import pytest
import torch

from .release_files import build_segmentor
from .toy_tools import REPO, TOOLS, data_root_options, make_toy_data, run

CONFIG = REPO / 'configs' / 'segman' / 'segman-t-ade20k-pre_1xb8-300i_toy-96x96.py'
CLASSIFIER = ['decode_head.conv_seg.bias', 'decode_head.conv_seg.weight']


@pytest.fixture(scope='module')
def toy_data(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp('toy'))


@pytest.fixture(scope='module')
def ade20k_checkpoint(tmp_path_factory):
    """SegMAN-T of the ADE20K config (150 classes) in the format get_release_checkpoint writes."""
    path = tmp_path_factory.mktemp('ckpt') / 'segman-t_ade20k.pth'
    model = build_segmentor(REPO / 'configs' / 'segman' / 'segman-t_4xb4-160k_ade20k-512x512.py')
    torch.save({'meta': {'converted_from': 'test', 'segman_arch': 't'}, 'state_dict': model.state_dict()}, path)
    return path


def start_fine_tuning(checkpoint: str, data: str, work_dir: str) -> None:
    """The example config through mmengine's runner, for 0 iterations (the runner initialises
    the weights, then loads ``load_from``); prints the tensors not equal to the checkpoint's."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    from mmseg_segman.checkpoint_safety import load_checkpoint_file
    cfg = Config.fromfile(str(CONFIG))
    cfg.merge_from_dict({'train_cfg.max_iters': 0, 'load_from': checkpoint,
                         **dict(option.split('=') for option in data_root_options(data))})
    cfg.work_dir = work_dir
    model = Runner.from_cfg(cfg).train()
    state = load_checkpoint_file(checkpoint)['state_dict']
    differ = sorted(k for k, v in model.state_dict().items() if not torch.equal(v, state[k]))
    print(json.dumps(dict(differ=differ)))


def test_training_starts_from_all_but_the_classifier(tmp_path, toy_data, ade20k_checkpoint):
    code, out = run('-c', 'import sys; from tests.test_tools_finetune import *; '
                    'start_fine_tuning(*sys.argv[1:])', ade20k_checkpoint, toy_data, tmp_path, cwd=REPO)
    assert code == 0, out[-3000:]
    assert json.loads(next(line for line in reversed(out.splitlines())
                           if line.startswith('{"differ'))) == dict(differ=CLASSIFIER)
    assert ('keeps its initialisation (reinit_mismatched_classifier=True): decode_head.conv_seg.weight: '
            'checkpoint (150, 128, 1, 1) vs model (5, 128, 1, 1)') in out, out[-3000:]


def test_test_py_refuses_the_checkpoint_of_another_class_count(tmp_path, toy_data, ade20k_checkpoint):
    code, out = run(TOOLS / 'test.py', CONFIG, ade20k_checkpoint, '--work-dir', tmp_path,
                    '--cfg-options', *data_root_options(toy_data), cwd=REPO)
    assert code != 0 and not re.search(r'mIoU: \d', out)
    assert 'decode_head.conv_seg.weight: checkpoint (150, 128, 1, 1) vs model (5, 128, 1, 1)' in out
    assert 'applies only when training starts from a checkpoint' in out, out[-3000:]
