"""The authors' released checkpoints, ready for mmseg 1.x: fetch, convert, check, report.

    python tools/get_release_checkpoint.py NAME [--file RELEASED] [--out FILE] [--trust-pickle]
    mim run mmseg_segman get_release_checkpoint NAME ...

NAME is a model of ``mim search mmseg_segman`` (``segman-t_4xb4-160k_ade20k-512x512``, ...;
the metafile's ``Converted From: Weights`` gives the release's Google Drive file) or an
ImageNet encoder, ``segman-encoder-t|s|b|l``. Without ``--file`` the released file is
downloaded with ``gdown`` (``pip install gdown``) into ``checkpoints/release/``; encoders sit
in a Drive folder without per-file links, so they need ``--file``. The file is converted with
``convert_official_checkpoint.py`` (weights-only read; ``--trust-pickle`` passes on), then
loaded strictly into the model of NAME's config, and the tool prints what it wrote and how to
use it. Default outputs: ``checkpoints/NAME.pth`` for segmentors and
``pretrained/SegMAN_Encoder_<size>.pth.tar`` (where the segmentation configs look) for encoders.
"""
import argparse
import subprocess
import sys
from pathlib import Path
from typing import Optional, Tuple

import torch
import yaml
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmseg.registry import MODELS

import mmseg_segman
from mmseg_segman.models import SegMANEncoder
from mmseg_segman.models.strict_loading import WeightsMismatchError

CONVERTER = Path(__file__).resolve().parent / 'convert_official_checkpoint.py'
ENCODER_FOLDER = 'https://drive.google.com/drive/folders/1QYU7nhpe0ddH7bPxI7VH4drc__07uEHs'
DATASETS = {'ADE20K': 'ade20k', 'Cityscapes': 'cityscapes', 'COCO-Stuff 164k': 'coco-stuff'}


def config_root() -> Path:
    """Where the configs and metafile are: the installed package's ``.mim``, else the checkout."""
    mim = Path(mmseg_segman.__file__).resolve().parent / '.mim'
    return mim if (mim / 'configs').is_dir() else Path(__file__).resolve().parents[1]


def release_models() -> dict:
    """Metafile entries by name."""
    metafile = config_root() / 'configs' / 'segman' / 'metafile.yaml'
    return {m['Name']: m for m in yaml.safe_load(metafile.read_text())['Models']}


def download(url: str, dst: Path) -> None:
    """Fetch a Google Drive file with gdown; exit with what to do instead if that fails."""
    instead = f'download {url} in a browser and pass it with --file'
    try:
        import gdown
    except ImportError:
        raise SystemExit(f'gdown is not installed: pip install gdown, or {instead}')
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        got = gdown.download(url, str(dst), fuzzy=True, quiet=False)
    except Exception as error:  # gdown raises several kinds for network and quota failures
        raise SystemExit(f'could not download {url} ({type(error).__name__}: {error}); {instead}')
    if got is None or not dst.is_file():
        raise SystemExit(f'could not download {url}; {instead}')


def convert(src: Path, dst: Path, kind: str, dataset: Optional[str], trust_pickle: bool) -> None:
    """Run the converter's command line (its messages are the user's)."""
    cmd = [sys.executable, str(CONVERTER), str(src), str(dst), '--kind', kind]
    cmd += ['--dataset', dataset] if dataset else []
    cmd += ['--trust-pickle'] if trust_pickle else []
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f'conversion of {src} failed (see above)')


def check_segmentor(dst: Path, config: Path) -> Tuple[str, str]:
    """Load ``dst`` strictly into the model of ``config``; a summary and the options it needs."""
    cfg = Config.fromfile(str(config))
    cfg.model.backbone.init_cfg = None
    ckpt = torch.load(dst, map_location='cpu', weights_only=True)
    num_classes = ckpt['state_dict']['decode_head.conv_seg.weight'].shape[0]
    options = ''
    if num_classes != cfg.model.decode_head.num_classes:
        # The release's SegMAN-T Cityscapes model has a 150-class head (its config's value).
        options = f' --cfg-options model.decode_head.num_classes={num_classes}'
        cfg.model.decode_head.num_classes = num_classes
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    model = MODELS.build(cfg.model)
    try:
        model.load_state_dict(ckpt['state_dict'], strict=True)
    except (RuntimeError, WeightsMismatchError) as error:
        raise SystemExit(f'{dst} does not fit {config.name}: {error}')
    params = sum(p.numel() for p in model.parameters()) / 1e6
    classes = len((ckpt['meta'].get('dataset_meta') or {}).get('classes', ()))
    summary = f'loads strictly into {config.name}{options} ({params:.2f}M parameters, ' \
              f'{num_classes} classes in the head, {classes} class names)'
    return summary, options


def check_encoder(dst: Path, size: str) -> str:
    state = torch.load(dst, map_location='cpu', weights_only=True)['state_dict']
    encoder = SegMANEncoder(arch=size)
    encoder.load_encoder_state({k: v for k, v in state.items() if not k.startswith('classifier.')},
                               str(dst))
    return f'loads into SegMANEncoder(arch={size!r})'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('name', help='a model of `mim search mmseg_segman`, or segman-encoder-t|s|b|l')
    parser.add_argument('--file', type=Path, help='the released file, already downloaded')
    parser.add_argument('--out', type=Path, help='converted checkpoint to write')
    parser.add_argument('--trust-pickle', action='store_true',
                        help="passed to the converter: full pickle, trusted files only")
    args = parser.parse_args()
    if args.file is not None and not args.file.is_file():
        parser.error(f'no such file: {args.file}')

    models = release_models()
    encoders = {f'segman-encoder-{size}': size for size in 'tsbl'}
    if args.name in encoders:
        size = args.name[-1]
        if args.file is None:
            parser.error(f'the released encoders are in the Drive folder {ENCODER_FOLDER}: '
                         f'download SegMAN_Encoder_{size}.pth.tar and pass it with --file')
        out = args.out or Path('pretrained') / f'SegMAN_Encoder_{size}.pth.tar'
        convert(args.file, out, 'encoder', None, args.trust_pickle)
        report = check_encoder(out, size)
        use = f"the segmentation configs of SegMAN-{size.upper()} read it from {out}" \
              if out == Path('pretrained') / f'SegMAN_Encoder_{size}.pth.tar' else \
              f'--cfg-options model.backbone.init_cfg.checkpoint={out}'
    elif args.name in models:
        model = models[args.name]
        config = config_root() / model['Config']
        src = args.file
        if src is None:
            src = Path('checkpoints') / 'release' / f'{args.name}.pth'
            if not src.is_file():
                download(model['Converted From']['Weights'], src)
        out = args.out or Path('checkpoints') / f'{args.name}.pth'
        convert(src, out, 'segmentor', DATASETS[model['Results']['Dataset']], args.trust_pickle)
        report, options = check_segmentor(out, config)
        use = f'python $MMSEG_TOOLS/test.py {config} {out}{options}'
    else:
        parser.error(f'unknown model {args.name!r}; known: ' + ', '.join(sorted(models) + sorted(encoders)))
    size_mb = out.stat().st_size / 2 ** 20
    print(f'wrote {out} ({size_mb:.1f} MiB): {report}\nuse it: {use}')


if __name__ == '__main__':
    main()
