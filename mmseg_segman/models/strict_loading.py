"""Weights load into a SegMAN module only if they are all there, of its shapes, and finite.

mmengine's ``load_checkpoint`` / ``Runner.load_checkpoint`` (``tools/test.py``, ``load_from``,
``--resume``, the mmseg inferencer, ``init_model``) only warns about missing keys and shape
mismatches, so a checkpoint of another SegMAN size, or one with no SegMAN weights, would give
results silently. :func:`refuse_mismatched_weights`, registered as a load-state-dict pre-hook
by the encoder and the head, raises instead, whatever loads the weights (torch and mmengine
call pre-hooks with ``strict=True`` for every module, whatever ``strict`` they were given).
"""
from typing import Dict, List

import torch
from torch import Tensor, nn


class WeightsMismatchError(ValueError):
    """The weights given to a SegMAN module do not fit it, or are not finite."""


def _listed(name: str, items: List[str], shown: int = 3) -> str:
    return f'{len(items)} {name}' + (f' {items[:shown]}' if items else '')


def refuse_mismatched_weights(module: nn.Module, state_dict: Dict[str, Tensor], prefix: str,
                              local_metadata: dict, strict: bool, missing_keys: list,
                              unexpected_keys: list, error_msgs: list) -> None:
    """Load-state-dict pre-hook: raise :class:`WeightsMismatchError` naming the tensors under
    ``prefix`` that are missing, unexpected, of another shape or not finite."""
    own = {prefix + k: v for k, v in module.state_dict().items()}
    given = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    # BatchNorm loads checkpoints without num_batches_tracked (mmengine ignores it too)
    missing = [k for k in own if k not in given and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in given if k not in own]
    shapes = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
              for k, v in given.items() if k in own and isinstance(v, Tensor)
              and v.shape != own[k].shape]
    non_finite = [k for k, v in given.items() if isinstance(v, Tensor) and v.is_floating_point()
                  and not torch.isfinite(v).all()]
    if not (missing or unexpected or shapes or non_finite):
        return
    name = type(module).__name__
    if not set(given) & set(own):
        raise WeightsMismatchError(
            f'the checkpoint has no {name} weights: none of its {len(own)} tensors under '
            f'{prefix!r} ({missing[:3]}, ...). Is it a checkpoint of another model?')
    raise WeightsMismatchError(
        f'the checkpoint does not fit {name} at {prefix!r}: {_listed("shape mismatches", shapes)}, '
        f'{_listed("missing tensors", missing)}, {_listed("unexpected tensors", unexpected)}, '
        f'{_listed("tensors with NaN or Inf", non_finite)}. Is it a checkpoint of another '
        'SegMAN size, or damaged?')
