"""The config's ``compile`` switch compiles the network, in training, validation and testing.

mmengine 0.10.7 reads ``compile`` from the config (``True``, or ``torch.compile``'s keyword
arguments as a dict) and compiles ``model.train_step`` when training starts; validation and
testing stay eager. A compiled ``train_step`` also traces the optimizer step, where dynamo
(torch 2.14) fails on mmengine's parameter groups, and the data preprocessor. So
:class:`CompileHook` compiles the network instead: the segmentor's encoder and decode head
(``nn.Module.compile``, their forward and, through it, backward), before training,
validation or testing starts, and undoes mmengine's compilation of ``train_step``. Data
preprocessing, losses, post-processing and the optimizer stay eager. Without ``compile`` it
does nothing.
"""
from typing import Optional

import torch

from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
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
class CompileHook(Hook):
    """Compiles the segmentor's ``backbone`` and ``decode_head`` when ``compile`` is set."""

    priority = 'LOWEST'

    def before_train(self, runner) -> None:
        # mmengine set a compiled train_step on the model (see the module doc): back to eager
        vars(runner.model).pop('train_step', None)
        self._compile(runner)

    def before_val(self, runner) -> None:
        self._compile(runner)

    def before_test(self, runner) -> None:
        self._compile(runner)

    @staticmethod
    def _compile(runner) -> None:
        options = compile_options(runner)
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        if options is None or getattr(model, '_segman_compiled', False):
            return
        parts = [name for name in ('backbone', 'neck', 'decode_head', 'auxiliary_head')
                 if isinstance(getattr(model, name, None), torch.nn.Module)]
        for name in parts:
            getattr(model, name).compile(**options)
        model._segman_compiled = True
        print_log(f'{", ".join(parts)} compiled with torch.compile({options}); the first '
                  'iterations are slower while it compiles', logger='current')
