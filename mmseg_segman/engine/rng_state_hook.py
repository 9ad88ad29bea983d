"""Resumed training draws the same random numbers as uninterrupted training.

mmengine 0.10.7 resumes the weights, optimizer, schedulers, message hub and iteration, and
replays the dataloader up to that iteration (``IterBasedTrainLoop`` re-runs the data pipeline
for the batches already trained on), but the random number generators restart from the seed.
Dropout, drop path and data augmentation then differ from an uninterrupted run.
"""
import logging
import random
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.runner import IterBasedTrainLoop
from mmseg.registry import HOOKS

CHECKPOINT_KEY = 'rng_states'


def get_rng_states() -> Dict[str, Any]:
    """The states of torch (the CPU's, and the current CUDA device's where CUDA is
    available), numpy and random. One CUDA state: the device this process trains on (under
    DDP every rank draws the same numbers on its own device, and only rank 0 saves)."""
    states = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(),
                  random=random.getstate())
    if torch.cuda.is_available():
        states['cuda'] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: Dict[str, Any]) -> None:
    """Restore what :func:`get_rng_states` returned, on any device count. mmengine's resume
    loads a checkpoint onto the GPU, and torch takes random states only as CPU byte tensors:
    they are moved back first (without that, every resume on a GPU failed at its first
    batch, docs/multi_gpu.md). A list of CUDA states (every device's, as this hook saved them
    before) restores its first, the device rank 0 trained on."""
    torch.set_rng_state(_cpu_bytes(states['torch']))
    np.random.set_state(states['numpy'])
    random.setstate(states['random'])
    cuda = states.get('cuda')
    if torch.cuda.is_available() and cuda is not None:
        torch.cuda.set_rng_state(_cpu_bytes(cuda[0] if isinstance(cuda, (list, tuple)) else cuda))


def _cpu_bytes(state: torch.Tensor) -> torch.Tensor:
    """A random state as torch takes it: a CPU ``uint8`` tensor."""
    return state.to(device='cpu', dtype=torch.uint8)


class _RestoreAfterReplay:
    """Wraps the train loop's dataloader iterator: after ``replayed`` batches (mmengine's
    skip of the batches already trained on), sets ``states`` and puts the iterator back."""

    def __init__(self, loop: IterBasedTrainLoop, replayed: int, states: Dict[str, Any]):
        self.loop, self.iterator = loop, loop.dataloader_iterator
        self.replayed, self.states = replayed, states

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> Any:
        if self.replayed == 0:
            set_rng_states(self.states)
            self.loop.dataloader_iterator = self.iterator
        self.replayed -= 1
        return next(self.iterator)


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Saves the random states in every checkpoint (``checkpoint['rng_states']``) and, on
    resume, restores them where the interrupted run stood: before the first new batch.

    Validation runs between saved random states, so it is made to leave them unchanged
    (it would otherwise draw, e.g. the val dataloader's worker seed, only in the
    uninterrupted run). With ``randomness.diff_rank_seed`` each rank has its own states and
    only rank 0's are saved, so nothing is restored (with a warning).
    """
    priority = 'VERY_LOW'

    def __init__(self) -> None:
        self._resumed: Optional[Dict[str, Any]] = None
        self._before_val: Optional[Dict[str, Any]] = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = self._before_val or get_rng_states()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._resumed = checkpoint.get(CHECKPOINT_KEY)

    def before_train(self, runner) -> None:
        states, self._resumed = self._resumed, None
        if states is None or (runner.iter == 0 and runner.epoch == 0):  # nothing, or load_from
            return
        if runner._randomness_cfg.get('diff_rank_seed') and runner.world_size > 1:
            print_log('RNGStateHook: random states differ per rank (diff_rank_seed); not restored',
                      logger='current', level=logging.WARNING)
        elif isinstance(runner.train_loop, IterBasedTrainLoop):
            runner.train_loop.dataloader_iterator = _RestoreAfterReplay(
                runner.train_loop, runner.iter, states)
        else:
            set_rng_states(states)

    def before_val(self, runner) -> None:
        self._before_val = get_rng_states()

    def after_val(self, runner) -> None:
        set_rng_states(self._before_val)
        self._before_val = None
