"""What autograd keeps for the backward pass of one SegMAN training forward (encoder and
ADE20K head, train mode), counted by storage.

    python tools/analysis_tools/saved_for_backward.py --arch b --batch 4 --size 512 512

On the ``meta`` device (the default) nothing is computed and every op runs its ``torch``
reference, so this gives the reference path's saved activations for any size in seconds and
no memory; it is the largest part of a training step's peak, not the peak (parameters,
gradients, optimizer state and temporaries come on top). ``--device cuda`` counts the ops'
own choice of backends there. Prints one JSON line.
"""
import argparse
import json

import torch

from mmseg_segman.models import SegMANEncoder, SegMANHead
from mmseg_segman.models.variants import ENCODER_ARCHS, head_widths
from mmseg_segman.ops import use_backends


def saved_bytes(arch: str, batch: int, height: int, width: int, device: str) -> int:
    encoder = SegMANEncoder(arch=arch).to(device).train()
    head = SegMANHead(**head_widths(arch, 'ade20k'), num_classes=150).to(device).train()
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage._cdata] = storage.nbytes()  # the StorageImpl: meta ones have no data_ptr
        return t

    images = torch.randn(batch, 3, height, width, device=device)
    with use_backends('torch' if device == 'meta' else None), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        head(encoder(images))
    return sum(storages.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--arch', choices=list(ENCODER_ARCHS), default='t')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--size', type=int, nargs=2, default=[512, 512], metavar=('H', 'W'))
    parser.add_argument('--device', default='meta')
    args = parser.parse_args()
    total = saved_bytes(args.arch, args.batch, *args.size, args.device)
    print(json.dumps(dict(arch=args.arch, batch=args.batch, size=args.size, device=args.device,
                          saved_gib=round(total / 2 ** 30, 2))))


if __name__ == '__main__':
    main()
