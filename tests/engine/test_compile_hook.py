"""The config's ``compile`` switch through mmseg's own tools: ``--cfg-options
compile.backend=eager`` compiles training (mmengine), validation and testing (the hook); dynamo
traces each whole step, the ``eager`` backend keeps it cheap on the CPU."""
import re

import pytest
import torch
from mmengine.config import Config

from mmseg_segman.engine.compile_hook import CompileHook, compile_options

from ..toy_tools import REPO, TOOLS, TOY_CONFIG, data_root_options, make_toy_data, run


class _Runner:
    def __init__(self, compile_option):
        self.cfg = Config(dict(compile=compile_option))
        self.model = torch.nn.Module()
        self.model.backbone, self.model.decode_head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        self.model.train_step = 'compiled by mmengine'


@pytest.mark.parametrize('option, expected', [(None, None), (False, None), (True, {}),
                                              ({'backend': 'eager'}, {'backend': 'eager'})])
def test_compile_options(option, expected):
    assert compile_options(_Runner(option)) == expected


def test_a_bad_compile_option_is_named():
    with pytest.raises(TypeError, match="compile must be True, False or a dict.*'yes'"):
        compile_options(_Runner('yes'))


def test_network_compiled_once_and_mmengines_train_step_undone():
    runner = _Runner({'backend': 'eager'})
    hook = CompileHook()
    hook.before_train(runner)
    assert 'train_step' not in vars(runner.model)
    backbone = runner.model.backbone
    assert backbone._compiled_call_impl is not None
    assert runner.model.decode_head._compiled_call_impl is not None
    compiled_call = backbone._compiled_call_impl
    hook.before_val(runner)
    hook.before_test(runner)
    assert backbone._compiled_call_impl is compiled_call
    eager = _Runner(None)
    hook.before_test(eager)
    assert eager.model.backbone._compiled_call_impl is None


def test_tools_train_and_test_run_compiled(tmp_path):
    """mmseg's train.py with ``compile.backend=eager`` trains and validates with the encoder and
    head compiled (mmengine's compiled train_step would fail in the optimizer); test.py
    compiled gives the eager run's mIoU."""
    toy = make_toy_data(tmp_path / 'toy')
    compiled = ['compile.backend=eager', *data_root_options(toy)]
    code, out = run(TOOLS / 'train.py', TOY_CONFIG, '--work-dir', tmp_path / 'train', '--cfg-options',
                    'train_cfg.max_iters=2', 'train_cfg.val_interval=2', 'train_dataloader.batch_size=2',
                    'default_hooks.checkpoint.interval=2', 'model.data_preprocessor.size=[64,64]',
                    *compiled, cwd=REPO, timeout=600)
    assert code == 0, out[-3000:]
    assert out.count('backbone, decode_head compiled with torch.compile') == 1, out[-3000:]
    checkpoint = tmp_path / 'train' / 'iter_2.pth'
    results = {}
    for name, options in (('eager', data_root_options(toy)), ('compiled', compiled)):
        code, out = run(TOOLS / 'test.py', TOY_CONFIG, checkpoint, '--work-dir', tmp_path / name,
                        '--cfg-options', *options, cwd=REPO, timeout=600)
        assert code == 0, out[-3000:]
        assert ('decode_head compiled with torch.compile' in out) == (name == 'compiled'), out[-3000:]
        results[name] = re.findall(r'mIoU: ([0-9.]+)', out)
    assert results['eager'] and results['compiled'] == results['eager']
