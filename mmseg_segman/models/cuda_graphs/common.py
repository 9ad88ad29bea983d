"""What a module's CUDA graphs are captured for, when a call may replay one, and the log they
share (:class:`~.training.TrainingGraph`, :class:`~.inference.InferenceGraph`)."""
from contextlib import nullcontext
from typing import ContextManager, List, Optional, Sequence, Tuple

import torch
from mmengine.logging import print_log
from torch import Tensor, nn

from ...ops.dispatch import traced


def signature(inputs: Sequence[Tensor]) -> Tuple:
    """What a graph is captured for: each input's shape, dtype, device and ``requires_grad``,
    the autocast state and whether inference mode is on (an inference tensor cannot be
    written outside it)."""
    autocast = torch.is_autocast_enabled('cuda')
    return (tuple((tuple(x.shape), x.dtype, x.device, x.requires_grad) for x in inputs),
            autocast and torch.get_autocast_dtype('cuda'), torch.is_inference_mode_enabled())


def describe(signature: Tuple) -> str:
    shapes = ', '.join(f'{tuple(shape)} {str(dtype).replace("torch.", "")}'
                       for shape, dtype, _, _ in signature[0])
    return shapes + (f' under {str(signature[1]).replace("torch.", "")} autocast'
                     if signature[1] else '')


def eager_only(inputs: Sequence[Tensor]) -> bool:
    """Whether this call must run eagerly whatever the module: inputs not all on the GPU, or
    the call is being compiled, traced, exported or captured into someone else's graph (where
    its kernels belong to that graph)."""
    return (not all(x.is_cuda for x in inputs) or traced()
            or torch.cuda.is_current_stream_capturing())


def modes(module: nn.Module) -> Tuple[bool, ...]:
    """The training flag of each module inside (batch norms and dropouts act on it)."""
    return tuple(m.training for m in module.modules())


def addresses(module: nn.Module) -> List[int]:
    return [t.data_ptr() for t in (*module.parameters(), *module.buffers())]


def _synchronised_norms(module: nn.Module) -> List[Tuple[str, nn.SyncBatchNorm]]:
    """The SyncBatchNorms inside ``module`` that exchange statistics: a distributed run."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return []
    return [(name, sub) for name, sub in module.named_modules()
            if isinstance(sub, nn.SyncBatchNorm)]


def synchronises(module: nn.Module) -> bool:
    """Whether ``module``'s step runs collectives (SyncBatchNorm in a distributed run): its
    capture then lets other threads call CUDA (NCCL's watchdog polls its events meanwhile)."""
    return bool(_synchronised_norms(module))


def unsupported(module: nn.Module) -> Optional[str]:
    """Why ``module``'s training step cannot be graphed, or None. A SyncBatchNorm's collectives
    can be captured on NCCL (PyTorch's SyncBatchNorm skips its host synchronisation while a
    graph captures), not on other backends."""
    for name, sub in module.named_modules():
        if sub._forward_hooks or sub._forward_pre_hooks or sub._backward_hooks \
                or sub._backward_pre_hooks:
            return f'module {name or type(module).__name__!r} has hooks, which a graph would not run'
    for name, norm in _synchronised_norms(module):
        backend = str(torch.distributed.get_backend(norm.process_group))
        if 'nccl' not in backend:
            return (f'module {name!r} is a SyncBatchNorm whose collectives run on the {backend!r} '
                    'backend, which a CUDA graph cannot hold (NCCL\'s can)')
    return None


def copy_into(statics: Sequence[Optional[Tensor]], givens: Sequence[Tensor]) -> None:
    """Copy each given tensor into its graph's static tensor, skipping a static that is None
    (no gradient flows there)."""
    for static, given in zip(statics, givens):
        if static is not None:
            static.copy_(given)


def capture_autocast() -> ContextManager:
    """The caller's autocast without its cache of cast weights: a cast made in a capture
    lives in the graph's memory, which later replays overwrite, so it must not be kept for
    eager calls."""
    if not torch.is_autocast_enabled('cuda'):
        return nullcontext()
    return torch.autocast('cuda', dtype=torch.get_autocast_dtype('cuda'), cache_enabled=False)


def capture_failed(name: str, what: str, error: Exception) -> RuntimeError:
    """The error for a capture that failed: a failed capture can leave CUDA's random number
    generator unusable (PyTorch 2.11), so it is refused, not worked around."""
    return RuntimeError(f'{name}: capturing its {what} as CUDA graphs failed '
                        f'({type(error).__name__}: {error}); set cuda_graph=False')


class GraphLog:
    """Log lines of a module's graphs (``say``: each kind once); ``name`` names the module."""

    def __init__(self, name: str):
        self.name = name
        self._said = set()

    def say(self, what: str, message: str) -> None:
        if what not in self._said:
            self._said.add(what)
            self.info(message)

    def info(self, message: str) -> None:
        print_log(f'{self.name}: {message}', logger='current')

    def warn(self, message: str) -> None:
        print_log(f'{self.name}: {message}', logger='current', level=30)
