"""The config's ``compile`` switch compiles validation and testing too.

mmengine 0.10.7 reads ``compile`` from the config (``True``, or ``torch.compile``'s keyword
arguments as a dict) and compiles ``model.train_step`` when training starts; validation and
testing stay eager. :class:`CompileEvalHook` applies the same setting to ``val_step`` and
``test_step`` the first time each runs, so that ``tools/test.py ... --cfg-options
compile=True`` runs the compiled model. Without ``compile`` it does nothing.
"""
from typing import Optional

import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmseg.registry import HOOKS


def compile_options(runner) -> Optional[dict]:
    """``torch.compile``'s keyword arguments from the config's ``compile``, or None (off)."""
    option = runner.cfg.get('compile', None)
    if option is None or option is False:
        return None
    if option is True:
        return {}
    if not isinstance(option, dict):
        raise TypeError(f'the config\'s compile must be True, False or a dict of torch.compile '
                        f'arguments, got {option!r}')
    return dict(option)


@HOOKS.register_module()
class CompileEvalHook(Hook):
    """Compiles ``val_step`` / ``test_step`` as mmengine compiles ``train_step``."""

    priority = 'LOWEST'

    def before_val(self, runner) -> None:
        self._compile(runner, 'val_step')

    def before_test(self, runner) -> None:
        self._compile(runner, 'test_step')

    @staticmethod
    def _compile(runner, target: str) -> None:
        options = compile_options(runner)
        step = getattr(runner.model, target)
        if options is None or getattr(step, '_segman_compiled', False):
            return
        compiled = torch.compile(step, **options)
        compiled._segman_compiled = True
        setattr(runner.model, target, compiled)
        print_log(f'{target} compiled with torch.compile({options}); the first iterations '
                  'are slower while it compiles', logger='current')
