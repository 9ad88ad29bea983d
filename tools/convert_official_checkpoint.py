"""Convert the authors' released SegMAN checkpoints into files mmseg 1.x loads.

    python tools/convert_official_checkpoint.py SRC DST [--kind auto|segmentor|encoder]
        [--dataset ade20k|cityscapes|coco-stuff] [--trust-pickle]

* Segmentation checkpoints (mmseg 0.x: ``meta``, ``state_dict`` with ``backbone.*`` and
  ``decode_head.*``, maybe ``optimizer``) become ``{'meta': {'dataset_meta': ...},
  'state_dict': ...}`` for ``load_from`` / ``tools/test.py``; classes and palette come from
  the old ``meta`` (``CLASSES``, ``PALETTE``) or ``--dataset``.
* ImageNet encoder files (timm: ``state_dict_ema`` / ``state_dict``, ``classifier.*``,
  ``args``, ``optimizer``) become ``{'state_dict': ...}`` with the EMA weights when present,
  classifier kept, for ``init_cfg=dict(type='Pretrained', checkpoint=DST)``.

The file (zip, or the legacy format of torch < 1.6) is read with
``torch.load(weights_only=True)`` and the plugin's allow-list (tensors, containers, numeric
numpy values, mmengine's HistoryBuffer, and here argparse.Namespace); mmcv 1.x
``ConfigDict`` objects (and addict ``Dict``) in an old ``meta`` are read as plain
``OrderedDict`` s. No pickled code runs. A file that needs anything else is refused unless
``--trust-pickle`` is given, which runs whatever the file contains: use it only on files you
trust. A zip whose CRC-32 checksums do not match (damaged bytes) and weights with NaN or Inf
are refused. The weights are checked by loading them strictly into the SegMAN model of the
size they belong to (inferred from the stem width and the stage depths).
"""
import argparse
import pickle
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from mmseg.utils import get_classes, get_palette
from torch import Tensor

from mmseg_segman.checkpoint_safety import CheckpointError, checked_checkpoint
from mmseg_segman.models import SegMANEncoder, SegMANHead
from mmseg_segman.models.backbones import stage_prefix
from mmseg_segman.models.strict_loading import WeightsMismatchError

DATASETS = {'ade20k': 'ade20k', 'cityscapes': 'cityscapes', 'coco-stuff': 'coco_stuff164k'}
# Classes of mmcv 1.x / addict that mmseg 0.x may leave in ``meta``, not importable now: read
# as OrderedDict (the weights-only unpickler fills it and sets its keys as attributes).
LEGACY_META_GLOBALS = [(OrderedDict, 'mmcv.utils.config.ConfigDict'),
                       (OrderedDict, 'addict.addict.Dict')]


def is_torch_file(path: Path) -> bool:
    """A zip archive (torch >= 1.6), or the legacy format, which starts with torch's magic
    number pickled (protocol 2 and later: a 10-byte little-endian LONG1)."""
    with path.open('rb') as f:
        head = f.read(16)
    return head.startswith(b'PK\x03\x04') or (
        head.startswith(pickle.PROTO) and torch.serialization.MAGIC_NUMBER.to_bytes(10, 'little') in head)


def load_untrusted(path: Path, trust_pickle: bool) -> dict:
    """The checkpoint dict (zip or legacy format), read weights-only unless ``trust_pickle``."""
    if not path.is_file():
        raise SystemExit(f'no checkpoint at {path}')
    if not is_torch_file(path):
        raise SystemExit(f'{path} is not a PyTorch checkpoint: neither a zip archive nor torch\'s '
                         'legacy format')
    try:
        if trust_pickle:
            ckpt = torch.load(path, map_location='cpu', weights_only=False)
        else:
            ckpt = checked_checkpoint(lambda: torch.load(path, map_location='cpu', weights_only=True),
                                      path, extra=(*LEGACY_META_GLOBALS, argparse.Namespace))
    except CheckpointError as error:
        raise SystemExit(f'{path}: {error}')
    except pickle.UnpicklingError as error:
        raise SystemExit(f'{path} holds objects beyond weights, numbers and the allow-list:\n'
                         f'{error}\nRe-run with --trust-pickle only if you trust this file.')
    except Exception as error:  # torch reports damaged or foreign files in many ways
        raise SystemExit(f'{path} is not a PyTorch checkpoint: {type(error).__name__}: {error}')
    if not isinstance(ckpt, dict):
        raise SystemExit(f'{path} is not a checkpoint dict but a {type(ckpt).__name__}')
    return ckpt


def infer_arch(encoder_state: Dict[str, Tensor]) -> str:
    """The released size whose widths and depths the encoder weights have."""
    if 'patch_embed.0.weight' not in encoder_state:
        raise SystemExit('not a SegMAN encoder state dict: it has no patch_embed.0.weight')
    width = encoder_state['patch_embed.0.weight'].shape[0] * 2
    prefixes = [f'{stage_prefix(i)}.blocks.' for i in range(4)]
    depths = [len({k[len(p):].split('.')[0] for k in encoder_state if k.startswith(p)}) for p in prefixes]
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
    widths = ('conv_seg.weight', 'linear_fuse.conv.weight', 'linear_c4.proj.weight')
    if any(k not in head_state for k in widths):
        raise SystemExit(f'not a SegMAN decode head: decode_head.* lacks one of {widths}')
    num_classes = head_state['conv_seg.weight'].shape[0]
    head = SegMANHead(in_channels=encoder.embed_dims,
                      channels=head_state['linear_fuse.conv.weight'].shape[0],
                      feat_proj_dim=head_state['linear_c4.proj.weight'].shape[0],
                      num_classes=num_classes)
    try:
        head.load_state_dict(head_state, strict=True)
    except (WeightsMismatchError, RuntimeError) as error:
        raise SystemExit(f'decode_head weights do not fit a SegMAN-{arch.upper()} head: {error}')
    return arch, num_classes


def dataset_meta(old_meta: dict, dataset: Optional[str], num_classes: int) -> Optional[dict]:
    """mmseg 1.x ``dataset_meta`` from ``--dataset``, else from mmseg 0.x ``CLASSES``/``PALETTE``."""
    if dataset is not None:
        name = DATASETS[dataset]
        meta = dict(classes=tuple(get_classes(name)), palette=[list(c) for c in get_palette(name)])
    elif 'CLASSES' in old_meta:
        meta = dict(classes=tuple(old_meta['CLASSES']),
                    palette=[[int(v) for v in c] for c in old_meta.get('PALETTE') or []])
    else:
        return None
    if len(meta['classes']) != num_classes:
        warnings.warn(f'{len(meta["classes"])} class names for a head of {num_classes} classes')
    return meta


def convert(src: Path, dst: Path, kind: str = 'auto', dataset: Optional[str] = None,
            trust_pickle: bool = False) -> dict:
    """Read ``src``, check it against SegMAN, write ``dst``; returns the new ``meta``."""
    ckpt = load_untrusted(src, trust_pickle)
    state = ckpt.get('state_dict_ema') or ckpt.get('state_dict') or ckpt
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()
             if isinstance(v, Tensor)}
    non_finite = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if non_finite:
        raise SystemExit(f'{src} has NaN or Inf in {len(non_finite)} tensors: {non_finite[:5]}')
    if kind == 'auto':
        kind = 'segmentor' if any(k.startswith('backbone.') for k in state) else 'encoder'
    meta = {'converted_from': src.name}
    try:
        if kind == 'segmentor':
            arch, num_classes = check_segmentor(state)
            found = dataset_meta(ckpt.get('meta') or {}, dataset, num_classes)
            if found is not None:
                meta['dataset_meta'] = found
            classes = f'{len(found["classes"])} class names' if found else 'no class names (pass --dataset)'
            summary = f'SegMAN-{arch.upper()} segmentor, {num_classes} classes, {classes}'
        else:
            encoder_state = {k: v for k, v in state.items() if not k.startswith('classifier.')}
            arch = infer_arch(encoder_state)
            SegMANEncoder(arch=arch).load_encoder_state(encoder_state, 'encoder weights')
            source = 'state_dict_ema' if 'state_dict_ema' in ckpt else 'state_dict'
            summary = f'SegMAN-{arch.upper()} encoder from {source}, ' \
                      f'{len(state) - len(encoder_state)} classifier tensors kept'
    except WeightsMismatchError as error:
        raise SystemExit(f'{src}: {error}')
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
    parser.add_argument('--dataset', choices=sorted(DATASETS),
                        help='classes and palette to store (default: those of the old meta)')
    parser.add_argument('--trust-pickle', action='store_true',
                        help='load with full pickle, which runs any code the file holds: trusted files only')
    args = parser.parse_args()
    convert(args.src, args.dst, args.kind, args.dataset, args.trust_pickle)


if __name__ == '__main__':
    main()
