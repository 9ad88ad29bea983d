"""Weights load into a SegMAN module only if they are all there, of its shapes, and finite.

mmengine's ``load_checkpoint`` / ``Runner.load_checkpoint`` (``tools/test.py``, ``load_from``,
``--resume``, the mmseg inferencer, ``init_model``) only warns about missing keys and shape
mismatches, so a checkpoint of another SegMAN size, or one with no SegMAN weights, would give
results silently. :func:`refuse_mismatched_weights`, registered as a load-state-dict pre-hook
by the encoder and the head, raises instead, whatever loads the weights (torch and mmengine
call pre-hooks with ``strict=True`` for every module, whatever ``strict`` they were given).

One exception, for fine-tuning on another class count: a head built with
``reinit_mismatched_classifier=True`` whose ``init_weights`` has run (training: mmengine's
runner initialises the weights before ``load_from`` or a segmentor's ``init_cfg`` loads a
checkpoint) keeps its initialised classifier where the checkpoint's has another shape, with a
warning. Testing and inference never initialise weights, so they still refuse such a checkpoint.
"""
import logging
from typing import Dict, List, Optional, Tuple

import torch
from mmengine.logging import print_log
from torch import Tensor, nn


class WeightsMismatchError(ValueError):
    """The weights given to a SegMAN module do not fit it, or are not finite."""


def _listed(name: str, items: List[str], shown: int = 3) -> str:
    return f'{len(items)} {name}' + (f' {items[:shown]}' if items else '')


def _described(shapes: Dict[str, Tuple[tuple, tuple]]) -> List[str]:
    return [f'{k}: checkpoint {ckpt} vs model {model}' for k, (ckpt, model) in shapes.items()]


def _classifier_mismatches(module: nn.Module, classifier: str,
                           shapes: Dict[str, Tuple[tuple, tuple]]) -> Tuple[List[str], str]:
    """The tensors under ``classifier`` whose shapes differ and that ``module`` may keep as
    initialised (see the module docstring), and a hint for the refusal of those it may not."""
    names = [k for k in shapes if k.startswith(classifier)]
    if not names:
        return [], ''
    if not module.reinit_mismatched_classifier:
        return [], (' If it has another class count: to fine-tune from it, set '
                    'reinit_mismatched_classifier=True in the head\'s config (docs/checkpoints.md).')
    if not module.is_init:
        return [], (' If it has another class count: reinit_mismatched_classifier keeps the '
                    'classifier that init_weights initialised, so it applies only when training '
                    'starts from a checkpoint (load_from, init_cfg); testing and inference need a '
                    'checkpoint of this class count.')
    return names, ''


def refuse_mismatched_weights(module: nn.Module, state_dict: Dict[str, Tensor], prefix: str,
                              local_metadata: dict, strict: bool, missing_keys: list,
                              unexpected_keys: list, error_msgs: list,
                              classifier: Optional[str] = None) -> None:
    """Load-state-dict pre-hook: raise :class:`WeightsMismatchError` naming the tensors under
    ``prefix`` that are missing, unexpected, of another shape or not finite.

    The tensors of ``classifier`` (a submodule's name: the head's ``conv_seg``) may differ in
    shape as the module's ``reinit_mismatched_classifier`` and ``is_init`` allow: they are then
    replaced in ``state_dict`` by the module's own, with one warning.
    """
    own = {prefix + k: v for k, v in module.state_dict().items()}
    given = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    # BatchNorm loads checkpoints without num_batches_tracked (mmengine ignores it too)
    missing = [k for k in own if k not in given and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in given if k not in own]
    shapes = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in given.items()
              if k in own and isinstance(v, Tensor) and v.shape != own[k].shape}
    kept, hint = ([], '') if classifier is None else _classifier_mismatches(
        module, f'{prefix}{classifier}.', shapes)
    refused = {k: v for k, v in shapes.items() if k not in kept}
    non_finite = [k for k, v in given.items() if isinstance(v, Tensor) and v.is_floating_point()
                  and not torch.isfinite(v).all()]
    name = type(module).__name__
    if missing or unexpected or refused or non_finite:
        if not set(given) & set(own):
            raise WeightsMismatchError(
                f'the checkpoint has no {name} weights: none of its {len(own)} tensors under '
                f'{prefix!r} ({missing[:3]}, ...). Is it a checkpoint of another model?')
        raise WeightsMismatchError(
            f'the checkpoint does not fit {name} at {prefix!r}: '
            f'{_listed("shape mismatches", _described(refused))}, '
            f'{_listed("missing tensors", missing)}, {_listed("unexpected tensors", unexpected)}, '
            f'{_listed("tensors with NaN or Inf", non_finite)}. Is it a checkpoint of another '
            f'SegMAN size, or damaged?{hint}')
    if kept:
        state_dict.update({k: own[k] for k in kept})
        print_log(f'{name}: the checkpoint\'s classifier does not fit, so it keeps its '
                  'initialisation (reinit_mismatched_classifier=True): '
                  + ', '.join(_described({k: shapes[k] for k in kept})), logger='current',
                  level=logging.WARNING)
