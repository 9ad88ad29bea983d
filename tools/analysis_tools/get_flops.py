"""FLOPs and parameters of a SegMAN (or any encoder-decoder) segmentor from its config.

    python tools/analysis_tools/get_flops.py CONFIG --shape H W [--show-table] [--cfg-options ...]

Same command line and output as mmseg 1.2.2's ``tools/analysis_tools/get_flops.py`` (which
does not run with mmengine 0.10.7), counted with mmengine's ``FlopAnalyzer`` plus the SegMAN
op rules of :mod:`mmseg_segman.flops`, on ``encode_decode`` (logits resized to the input),
as the authors' release counted the paper's figures. FLOPs are multiply-adds.
"""
import argparse
from pathlib import Path

import torch
from mmengine import Config, DictAction
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import init_default_scope
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

from mmseg_segman.flops import segmentor_complexity


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Get the FLOPs of a segmentor')
    parser.add_argument('config', help='config file path')
    parser.add_argument('--shape', type=int, nargs='+', default=[2048, 1024],
                        help='input image size: H W, or one value for a square')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='device to trace on')
    parser.add_argument('--show-table', action='store_true',
                        help="print mmengine's per-module table of parameters and FLOPs")
    parser.add_argument('--max-depth', type=int, default=3, help='module depth of the table')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override some settings in the used config, the key-value pair in xxx=yyy format '
        'will be merged into config file')
    args = parser.parse_args()
    if len(args.shape) not in (1, 2) or min(args.shape) < 1:
        parser.error(f'--shape takes one or two positive sizes, got {args.shape}')
    if not Path(args.config).is_file():
        parser.error(f'config file {args.config} does not exist')
    return args


def main() -> None:
    args = parse_args()
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    input_shape = (3, args.shape[0], args.shape[-1])

    model = revert_sync_batchnorm(MODELS.build(cfg.model)).to(args.device).eval()
    meta = dict(ori_shape=input_shape[1:], img_shape=input_shape[1:], pad_shape=input_shape[1:])
    data = model.data_preprocessor(
        dict(inputs=[torch.rand(input_shape)], data_samples=[SegDataSample(metainfo=meta)]))
    with torch.no_grad():
        result = segmentor_complexity(model, data['inputs'], args.show_table, args.max_depth)

    split_line = '=' * 30
    pad_shape = tuple(data['inputs'].shape[-2:])
    if pad_shape != input_shape[1:]:
        print(f'{split_line}\nUse size divisor set input shape from {input_shape[1:]} to {pad_shape}')
    print(f'{split_line}\nCompute type: direct: randomly generate a picture\n'
          f'Input shape: {pad_shape}\nFlops: {result["flops"] / 1e9:.3f}G\n'
          f'Params: {result["params"] / 1e6:.3f}M\n{split_line}')
    if args.show_table:
        print(result['table'])
    print('!!!Please be cautious if you use the results in papers. '
          'You may need to check if all ops are supported and verify '
          'that the flops computation is correct.')


if __name__ == '__main__':
    main()
