"""What autograd keeps for the backward pass of one SegMAN training forward (encoder and
ADE20K head, train mode), counted by storage, in all and by module type.

    python tools/analysis_tools/saved_for_backward.py --arch b --batch 4 --size 512 512
    python tools/analysis_tools/saved_for_backward.py --arch l --batch 8 --path fast --amp [--graphed]

By default nothing is computed, and no GPU is needed:

* ``--path ref`` (default): every op on its ``torch`` reference, on the ``meta`` device;
* ``--path fast``: what a CUDA GPU with Triton runs (each op's automatic backend choice), on
  fake CUDA tensors (``FakeTensorMode``, ``--device fake-cuda``): the ops' own autograd saves
  what it saves on the GPU, while their Triton kernels are not launched (fake tensors hold
  no data). ``--amp``: under bf16 autocast, as the benchmark's and the configs' AMP training.
  ``--graphed``: as the configs' training graphs capture the step (``cuda_graph=True``), where
  the blocks' cheap maps are recomputed rather than kept (``models/layers/recompute.py``).

``--device cpu`` or ``cuda`` runs the model for real instead (on the CPU the fast path needs
``TRITON_INTERPRET=1``).

The count is the largest part of a training step's peak, not the peak: parameters, gradients,
optimizer state, the loss (the logits resized to the labels) and temporaries come on top.
Prints one JSON line: ``saved_gib`` and ``by_module_type`` (GiB, largest first; a tensor
counts for the innermost module whose forward saved it).
"""
import argparse
import json
from collections import Counter
from contextlib import contextmanager, nullcontext
from typing import Dict, Iterator, Optional, Tuple
from unittest import mock

import torch
from mmseg_segman.models import SegMANEncoder, SegMANHead
from mmseg_segman.models.layers.recompute import recomputing
from mmseg_segman.models.variants import ENCODER_ARCHS, head_widths
from mmseg_segman.ops import use_backends


@contextmanager
def fake_cuda() -> Iterator[None]:
    """Fake CUDA tensors on any machine (``FakeTensorMode``), Triton kernels not launched."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mmseg_segman.ops.triton_jit import kernels_not_launched

    with FakeTensorMode(allow_non_fake_inputs=True), kernels_not_launched():
        yield


@contextmanager
def cuda_bf16_autocast() -> Iterator[None]:
    """bf16 autocast for CUDA, also where the machine has no GPU (on fake CUDA tensors)."""
    with mock.patch('torch.cuda.is_available', lambda: True), \
            mock.patch('torch.cuda.is_bf16_supported', lambda *a, **k: True), \
            torch.autocast('cuda', dtype=torch.bfloat16):
        yield


def default_device(path: str) -> str:
    """``'fake-cuda'`` for the fast path, ``'meta'`` for the reference."""
    return 'fake-cuda' if path == 'fast' else 'meta'


def saved_bytes_by_module(arch: str, batch: int, height: int, width: int, path: str = 'ref',
                          amp: bool = False, device: Optional[str] = None, graphed: bool = False
                          ) -> Tuple[int, Dict[str, int]]:
    """Bytes of the distinct storages autograd keeps, in all and by module type.

    ``path``: ``'ref'`` (every op on its reference) or ``'fast'`` (automatic backend choice);
    ``device``: ``'meta'`` (the default of ``'ref'``), ``'fake-cuda'`` (the default of
    ``'fast'``: :func:`fake_cuda`) or a real device; ``amp``: bf16 autocast (CUDA only);
    ``graphed``: as inside a training graph's capture (maps recomputed, :func:`recomputing`)."""
    device = device or default_device(path)
    if amp and 'cuda' not in device:
        raise ValueError(f'amp is bf16 autocast for CUDA: it needs the fast path or a CUDA '
                         f'device, not {device!r}')
    encoder = SegMANEncoder(arch=arch).train()
    head = SegMANHead(**head_widths(arch, 'ade20k'), num_classes=150).train()
    storages: Dict[int, int] = {}
    params = set()  # the parameters' storages, not counted
    by_type: Counter = Counter()
    owners = []  # the modules whose forward is running, innermost last

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata  # the StorageImpl: meta and fake ones have no data_ptr
        if key not in storages and key not in params:
            storages[key] = storage.nbytes()
            by_type[type(owners[-1]).__name__] += storage.nbytes()
        return t

    def enter(module, args):
        owners.append(module)

    def leave(module, args, output):
        owners.pop()

    modules = (*encoder.modules(), *head.modules())
    hooks = [m.register_forward_pre_hook(enter) for m in modules] + \
        [m.register_forward_hook(leave) for m in modules]
    with fake_cuda() if device == 'fake-cuda' else nullcontext(), \
            use_backends('torch' if path == 'ref' else None):
        device = 'cuda' if device == 'fake-cuda' else device
        encoder, head = encoder.to(device), head.to(device)
        params.update(p.untyped_storage()._cdata for p in (*encoder.parameters(), *head.parameters()))
        images = torch.randn(batch, 3, height, width, device=device)
        with cuda_bf16_autocast() if amp else nullcontext(), recomputing(graphed), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            head(encoder(images))
    for hook in hooks:
        hook.remove()
    return sum(storages.values()), dict(by_type.most_common())


def saved_bytes(arch: str, batch: int, height: int, width: int, device: str = 'meta') -> int:
    """Bytes autograd keeps on the reference path (:func:`saved_bytes_by_module`)."""
    return saved_bytes_by_module(arch, batch, height, width, 'ref', device=device)[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--arch', choices=list(ENCODER_ARCHS), default='t')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--size', type=int, nargs=2, default=[512, 512], metavar=('H', 'W'))
    parser.add_argument('--path', choices=['ref', 'fast'], default='ref',
                        help="'ref': every op on its torch reference; 'fast': each op's automatic "
                             'backend choice')
    parser.add_argument('--amp', action='store_true', help='bf16 autocast (CUDA devices only)')
    parser.add_argument('--graphed', action='store_true',
                        help='as the training graphs capture the step: cheap maps recomputed')
    parser.add_argument('--device', help="'meta' (default of --path ref), 'fake-cuda' (default of "
                                         "--path fast) or a real device")
    args = parser.parse_args()
    device = args.device or default_device(args.path)
    try:
        total, by_type = saved_bytes_by_module(args.arch, args.batch, *args.size, args.path,
                                               args.amp, device, args.graphed)
    except ValueError as error:
        parser.error(str(error))
    print(json.dumps(dict(arch=args.arch, batch=args.batch, size=args.size, path=args.path,
                          device=device, amp=args.amp, graphed=args.graphed, saved_gib=round(total / 2 ** 30, 2),
                          by_module_type={k: round(v / 2 ** 30, 3) for k, v in by_type.items()})))


if __name__ == '__main__':
    main()
