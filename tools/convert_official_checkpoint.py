"""Convert the authors' released SegMAN checkpoints into files mmseg 1.x loads.

    python tools/convert_official_checkpoint.py SRC DST [--kind auto|segmentor|encoder]

* Segmentation checkpoints (mmseg 0.x: ``meta``, ``state_dict`` with ``backbone.*`` and
  ``decode_head.*``, maybe ``optimizer``) become ``{'meta': {'dataset_meta': ...},
  'state_dict': ...}`` for ``load_from`` / ``tools/test.py``.
* ImageNet encoder files (timm: ``state_dict_ema`` / ``state_dict``, ``classifier.*``,
  ``args``, ``optimizer``) become ``{'state_dict': ...}`` with the EMA weights when present,
  classifier kept, for ``init_cfg=dict(type='Pretrained', checkpoint=DST)``.

The file is read with ``torch.load(weights_only=True)`` and the plugin's allow-list (tensors,
containers, numpy values, mmengine's HistoryBuffer, argparse.Namespace): no pickled code runs.
A file that needs anything else is refused unless ``--trust-pickle`` is given, which runs
whatever the file contains: use it only on files you trust. The weights are checked by
loading them strictly into the SegMAN model of the size they belong to.
"""
import argparse
import pickle
from pathlib import Path
from typing import Dict, Tuple

import torch
from torch import Tensor

from mmseg_segman.models import SegMANEncoder, SegMANHead


def load_untrusted(path: Path, trust_pickle: bool) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f'no checkpoint at {path}')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=not trust_pickle)
    except pickle.UnpicklingError as error:
        raise SystemExit(f'{path} holds objects beyond weights, numbers and the allow-list:\n'
                         f'{error}\nRe-run with --trust-pickle only if you trust this file.')
    if not isinstance(ckpt, dict):
        raise SystemExit(f'{path} is not a checkpoint dict but a {type(ckpt).__name__}')
    return ckpt


def infer_arch(encoder_state: Dict[str, Tensor]) -> str:
    """The released size whose widths and depths the encoder weights have."""
    if 'patch_embed.0.weight' not in encoder_state:
        raise SystemExit('not a SegMAN encoder state dict: it has no patch_embed.0.weight')
    width = encoder_state['patch_embed.0.weight'].shape[0] * 2
    depths = [len({k.split('.')[3] for k in encoder_state if k.startswith(f'layers.{2 * i}.blocks.')})
              for i in range(4)]
    for name, arch in SegMANEncoder.arch_zoo.items():
        if arch['embed_dims'][0] == width and arch['depths'] == depths:
            return name
    raise SystemExit(f'encoder weights of width {width} and depths {depths} match no released '
                     f'SegMAN size ({sorted(SegMANEncoder.arch_zoo)})')


def split_prefix(state: Dict[str, Tensor], prefix: str) -> Dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def check_segmentor(state: Dict[str, Tensor]) -> Tuple[str, int]:
    """Load the weights strictly into a SegMAN of their size; return (arch, num_classes)."""
    encoder_state = split_prefix(state, 'backbone.')
    head_state = split_prefix(state, 'decode_head.')
    others = [k for k in state if not k.startswith(('backbone.', 'decode_head.'))]
    if others:
        raise SystemExit(f'unexpected keys outside backbone./decode_head.: {others[:5]}')
    arch = infer_arch(encoder_state)
    encoder = SegMANEncoder(arch=arch)
    encoder.load_encoder_state(encoder_state, 'backbone weights')
    num_classes = head_state['conv_seg.weight'].shape[0]
    head = SegMANHead(in_channels=encoder.embed_dims,
                      channels=head_state['linear_fuse.conv.weight'].shape[0],
                      feat_proj_dim=head_state['linear_c4.proj.weight'].shape[0],
                      num_classes=num_classes)
    head.load_state_dict(head_state, strict=True)
    return arch, num_classes


def convert(src: Path, dst: Path, kind: str = 'auto', trust_pickle: bool = False) -> dict:
    ckpt = load_untrusted(src, trust_pickle)
    state = ckpt.get('state_dict_ema') or ckpt.get('state_dict') or ckpt
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()
             if isinstance(v, Tensor)}
    if kind == 'auto':
        kind = 'segmentor' if any(k.startswith('backbone.') for k in state) else 'encoder'
    meta = {'converted_from': src.name}
    if kind == 'segmentor':
        arch, num_classes = check_segmentor(state)
        old_meta = ckpt.get('meta') or {}
        if 'CLASSES' in old_meta:
            meta['dataset_meta'] = dict(classes=tuple(old_meta['CLASSES']),
                                        palette=[list(c) for c in old_meta.get('PALETTE') or []])
        summary = f'SegMAN-{arch.upper()} segmentor, {num_classes} classes'
    else:
        encoder_state = {k: v for k, v in state.items() if not k.startswith('classifier.')}
        arch = infer_arch(encoder_state)
        SegMANEncoder(arch=arch).load_encoder_state(encoder_state, 'encoder weights')
        source = 'state_dict_ema' if 'state_dict_ema' in ckpt else 'state_dict'
        summary = f'SegMAN-{arch.upper()} encoder from {source}, ' \
                  f'{len(state) - len(encoder_state)} classifier tensors kept'
    meta['segman_arch'] = arch
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'meta': meta, 'state_dict': state}, dst)
    print(f'{src} -> {dst}: {summary}, {len(state)} tensors')
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', type=Path, help='released checkpoint')
    parser.add_argument('dst', type=Path, help='converted checkpoint to write')
    parser.add_argument('--kind', choices=['auto', 'segmentor', 'encoder'], default='auto')
    parser.add_argument('--trust-pickle', action='store_true',
                        help='load with full pickle (runs code in the file): trusted files only')
    args = parser.parse_args()
    convert(args.src, args.dst, args.kind, args.trust_pickle)


if __name__ == '__main__':
    main()
