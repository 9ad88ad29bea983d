"""A module's forward replayed as CUDA graphs: its training steps (:mod:`.training`) and its
inference calls (:mod:`.inference`)."""
from typing import Callable

from torch import Tensor, nn

from .inference import InferenceGraph
from .training import TrainingGraph

__all__ = ['CUDAGraphs', 'InferenceGraph', 'TrainingGraph']


class CUDAGraphs:
    """``forward(*inputs)`` of a module through a :class:`TrainingGraph` while it trains and an
    :class:`InferenceGraph` while it evaluates; back in training, the inference graphs are
    released (their memory is the training step's). ``name`` names the module in the log."""

    def __init__(self, name: str):
        self.training = TrainingGraph(name)
        self.inference = InferenceGraph(name)

    def __call__(self, module: nn.Module, forward: Callable, *inputs: Tensor):
        if module.training:
            self.inference.release()
            return self.training(module, forward, *inputs)
        return self.inference(module, forward, *inputs)
