"""The config's ``compile`` switch reaches testing: mmseg's ``tools/test.py`` with
``--cfg-options compile.backend=eager`` runs a compiled ``test_step`` (dynamo traces the whole
step; the ``eager`` backend keeps it cheap on the CPU) with the eager run's metrics."""
import re

import pytest
import torch
from mmengine.config import Config

from mmseg_segman.engine.compile_hook import CompileEvalHook, compile_options

from ..toy_tools import REPO, TOOLS, TOY_CONFIG, data_root_options, make_toy_data, run


class _Runner:
    def __init__(self, compile_option):
        self.cfg = Config(dict(compile=compile_option))
        self.model = torch.nn.Identity()
        self.model.test_step = lambda data: data


@pytest.mark.parametrize('option, expected', [(None, None), (False, None), (True, {}),
                                              ({'backend': 'eager'}, {'backend': 'eager'})])
def test_compile_options(option, expected):
    assert compile_options(_Runner(option)) == expected


def test_a_bad_compile_option_is_named():
    with pytest.raises(TypeError, match="compile must be True, False or a dict.*'yes'"):
        compile_options(_Runner('yes'))


def test_test_step_compiled_once():
    runner = _Runner({'backend': 'eager'})
    hook = CompileEvalHook()
    hook.before_test(runner)
    compiled = runner.model.test_step
    assert compiled._segman_compiled and compiled(3) == 3
    hook.before_test(runner)
    assert runner.model.test_step is compiled


def test_tools_test_runs_compiled_with_the_eager_metrics(tmp_path):
    toy = make_toy_data(tmp_path / 'toy')
    checkpoint = tmp_path / 'random.pth'
    code, out = run('-c', 'import sys, torch; from mmengine.config import Config; '
                    'from mmseg.registry import MODELS; from mmseg.utils import register_all_modules; '
                    'import mmseg_segman; register_all_modules(); torch.manual_seed(0); '
                    'model = MODELS.build(Config.fromfile(sys.argv[1]).model); '
                    'torch.save(dict(state_dict=model.state_dict()), sys.argv[2])',
                    TOY_CONFIG, checkpoint, cwd=REPO, timeout=300)
    assert code == 0, out[-3000:]
    results = {}
    for name, extra in (('eager', []), ('compiled', ['compile.backend=eager'])):
        code, out = run(TOOLS / 'test.py', TOY_CONFIG, checkpoint, '--work-dir', tmp_path / name,
                        '--cfg-options', *data_root_options(toy), *extra, cwd=REPO, timeout=600)
        assert code == 0, out[-3000:]
        assert ('test_step compiled with torch.compile' in out) == (name == 'compiled'), out[-3000:]
        results[name] = re.findall(r'mIoU: ([0-9.]+)', out)
    assert results['eager'] and results['compiled'] == results['eager']
