"""Export a SegMAN segmentor to ONNX with dynamic batch, height and width; check it with
onnxruntime against PyTorch.

    python tools/deployment/export_onnx.py CONFIG [CHECKPOINT] OUT.onnx --shape H W \
        [--verify-shape H W [--verify-shape H W ...]] [--tolerance 1e-4] [--opset 17] \
        [--cfg-options ...]
    mim run mmseg_segman export_onnx CONFIG [CHECKPOINT] OUT.onnx --shape H W

The graph is the segmentor's whole-image ``encode_decode``: input ``input``, the image
normalised as the config's ``data_preprocessor`` does it (channel order and ``(x - mean) /
std``; the graph does not normalise), float32 ``(N, 3, H, W)``; output ``output``, the class
logits at the input size, float32 ``(N, num_classes, H, W)`` (mmdeploy's ``with_argmax=False``
output; ``argmax`` over dim 1 gives the label map). N, H and W are dynamic. The model is traced
at ``--shape`` by torch's TorchScript exporter on the pure-PyTorch references of the SegMAN
ops, then onnxruntime runs the file at two other sizes (default: batch 2 at ``H+32 x W+64``
and an odd size, ``3H/4+1 x 3W/4+3``) and the largest difference from PyTorch must be within
``--tolerance``. Without CHECKPOINT the weights are random (seed 0), for trying the export.
docs/deployment.md has the details. Needs ``pip install onnx onnxruntime``.
"""
import argparse
import json
import pickle
import sys
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from mmengine.config import Config, DictAction
from mmengine.model import revert_sync_batchnorm
from torch import Tensor, nn

import mmseg_segman  # noqa: F401  (registers SegMAN; configs also import it)
from mmseg_segman.models.strict_loading import WeightsMismatchError
from mmseg_segman.ops import use_backends

INPUT, OUTPUT = 'input', 'output'
DYNAMIC_AXES = {INPUT: {0: 'batch', 2: 'height', 3: 'width'},
                OUTPUT: {0: 'batch', 2: 'height', 3: 'width'}}
INSTALL_HINT = 'pip install onnx onnxruntime'


class SegmentorLogits(nn.Module):
    """A segmentor's ``encode_decode`` as a function of one tensor: normalised images
    ``(N, 3, H, W)`` -> logits ``(N, num_classes, H, W)`` (what mmseg's whole-image inference
    computes before its argmax)."""

    def __init__(self, segmentor: nn.Module):
        super().__init__()
        self.segmentor = segmentor

    def forward(self, inputs: Tensor) -> Tensor:
        # a torch.Size img_shape makes the decode head resize to exactly the input's size
        return self.segmentor.encode_decode(inputs, [dict(img_shape=inputs.shape[2:])])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Export a SegMAN segmentor to ONNX (dynamic batch, height and width) and '
        'check it with onnxruntime',
        usage='%(prog)s CONFIG [CHECKPOINT] OUTPUT.onnx --shape H W [options]')
    parser.add_argument('config', help='segmentation config file')
    parser.add_argument('paths', nargs='+', metavar='[CHECKPOINT] OUTPUT.onnx',
                        help='checkpoint (omit it to export random weights) and the ONNX file to write')
    parser.add_argument('--shape', type=int, nargs=2, required=True, metavar=('H', 'W'),
                        help='input size the model is traced at (the file takes any size)')
    parser.add_argument('--verify-shape', type=int, nargs=2, action='append', metavar=('H', 'W'),
                        help='a size onnxruntime is checked at (repeat it; default: two sizes '
                        'other than --shape, the first with batch 2)')
    parser.add_argument('--tolerance', type=float, default=1e-4,
                        help='largest allowed |onnxruntime - PyTorch| of the logits')
    parser.add_argument('--opset', type=int, default=17, help='ONNX opset (12 or more: einsum)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='config settings to override, as key=value pairs')
    args = parser.parse_args()
    if len(args.paths) > 2:
        parser.error(f'expected CONFIG [CHECKPOINT] OUTPUT.onnx, got {len(args.paths) + 1} paths')
    *checkpoint, output = args.paths
    args.checkpoint, args.output = (checkpoint[0] if checkpoint else None), Path(output)
    if args.output.suffix != '.onnx':
        parser.error(f'the output must be a .onnx file, got {output}' +
                     (' (did you forget OUTPUT.onnx after the checkpoint?)' if not checkpoint else ''))
    if not Path(args.config).is_file():
        parser.error(f'config file {args.config} does not exist')
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        parser.error(f'checkpoint {args.checkpoint} does not exist (omit it to export random weights)')
    for shape in [args.shape] + (args.verify_shape or []):
        if min(shape) < 1:
            parser.error(f'sizes must be positive, got {shape[0]} {shape[1]}')
    if args.opset < 12:
        parser.error(f'--opset {args.opset}: SegMAN needs opset 12 or later (einsum)')
    return args


def warn(message: str) -> None:
    print(f'WARNING: {message}', file=sys.stderr)


def require_onnx() -> None:
    """Stop with how to install them if ``onnx`` (needed by torch's exporter) or
    ``onnxruntime`` (the check) is missing."""
    for name in ('onnx', 'onnxruntime'):
        try:
            __import__(name)
        except ImportError:
            raise SystemExit(f'{name} is not installed; export_onnx needs onnx and onnxruntime: '
                             f'{INSTALL_HINT}')


def default_verify_shapes(height: int, width: int) -> List[Tuple[int, int, int]]:
    """``(batch, H, W)`` to check at: batch 2 at a larger size, batch 1 at a smaller odd one."""
    return [(2, height + 32, width + 64), (1, height * 3 // 4 + 1, width * 3 // 4 + 3)]


def load_config(path: str, cfg_options: Optional[dict]) -> Config:
    """The config, refused with the reason if it does not describe an encoder-decoder segmentor."""
    try:
        cfg = Config.fromfile(path)
    except Exception as error:  # syntax errors, missing bases, unknown package scopes
        raise SystemExit(f'cannot read config {path}: {type(error).__name__}: {error}')
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    model = cfg.get('model')
    if not isinstance(model, dict) or 'decode_head' not in model or 'backbone' not in model:
        kind = model.get('type') if isinstance(model, dict) else None
        raise SystemExit(f'{path} is not a segmentation config: its model is {kind!r}, without a '
                         'backbone and decode_head; export_onnx exports encoder-decoder '
                         'segmentors such as configs/segman/segman-t_4xb4-160k_ade20k-512x512.py')
    return cfg


def build_segmentor(cfg: Config, config_path: str, checkpoint: Optional[str]) -> nn.Module:
    """The segmentor of ``cfg`` on the CPU in eval mode, BN for SyncBN, with ``checkpoint``'s
    weights (loaded strictly and safely) or random ones (seed 0, with a warning)."""
    from mmseg.apis import init_model

    torch.manual_seed(0)
    try:
        model = init_model(cfg, None, device='cpu')
    except Exception as error:  # unregistered types, bad arguments
        raise SystemExit(f'cannot build the model of {config_path}: {type(error).__name__}: {error}')
    if not hasattr(model, 'encode_decode'):
        raise SystemExit(f'{config_path} builds a {type(model).__name__}, which has no encode_decode; '
                         'export_onnx exports encoder-decoder segmentors')
    if checkpoint is None:
        warn('no CHECKPOINT given: exporting RANDOMLY INITIALISED weights (seed 0); the file is '
             'good for trying the export, not for predictions')
    else:
        from mmengine.runner import load_checkpoint
        try:  # refuses unsafe, damaged or mismatching checkpoints (mmseg_segman.checkpoint_safety)
            meta = load_checkpoint(model, checkpoint, map_location='cpu').get('meta') or {}
        except (pickle.UnpicklingError, WeightsMismatchError) as error:
            raise SystemExit(f'cannot use {checkpoint}: {error}')
        if 'dataset_meta' in meta:
            model.dataset_meta = meta['dataset_meta']
    if cfg.model.get('test_cfg', {}).get('mode', 'whole') != 'whole':
        warn(f'{config_path} tests in {cfg.model.test_cfg.mode!r} mode; the exported graph is '
             'whole-image inference (cut the image into windows yourself to match)')
    return revert_sync_batchnorm(model).eval()


def export(module: nn.Module, sample: Tensor, output: Path, opset: int) -> None:
    """Trace ``module`` at ``sample`` with torch's TorchScript exporter, on the ops' references."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # TracerWarnings name the shape checks, which hold at every size; the exporter's own
        # deprecation notice is answered in docs/deployment.md; the bias tables are indexed with
        # non-negative indices only; strided slices are left unfolded, as they should be
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        for message in ('You are using the legacy TorchScript-based ONNX export',
                        'Exporting aten::index operator of advanced indexing', 'Constant folding'):
            warnings.filterwarnings('ignore', message=message)
        with use_backends('torch'), torch.no_grad():
            torch.onnx.export(module, (sample, ), str(output), dynamo=False, opset_version=opset,
                              input_names=[INPUT], output_names=[OUTPUT], dynamic_axes=DYNAMIC_AXES)


def preprocessing(cfg: Config) -> dict:
    """What the graph expects done to an image loaded by mmcv (BGR), from the data_preprocessor."""
    pre = cfg.model.get('data_preprocessor') or cfg.get('data_preprocessor') or {}
    return dict(channel_order='rgb' if pre.get('bgr_to_rgb') else 'bgr',
                mean=list(pre.get('mean') or [0.0] * 3), std=list(pre.get('std') or [1.0] * 3))


def annotate(output: Path, model: nn.Module, cfg: Config, config_path: str,
             checkpoint: Optional[str]) -> dict:
    """Declare the output's class count (ONNX shape inference loses it at the final Resize) and
    write the preprocessing, classes and sources into the file's metadata; return those."""
    import onnx

    # classes: the checkpoint's dataset_meta, else the config's test dataset metainfo
    classes = (getattr(model, 'dataset_meta', None) or {}).get('classes') or \
        cfg.get('test_dataloader', {}).get('dataset', {}).get('metainfo', {}).get('classes')
    meta = dict(preprocessing(cfg), num_classes=model.decode_head.num_classes,
                classes=list(classes) if classes else None, config=Path(config_path).name,
                checkpoint=Path(checkpoint).name if checkpoint else 'none (random weights)')
    proto = onnx.load(str(output))
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = meta['num_classes']
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    onnx.save(proto, str(output))
    return meta


def verify(module: nn.Module, output: Path, shapes: Sequence[Tuple[int, int, int]],
           tolerance: float) -> List[Tuple[Tuple[int, int, int], float, float, float]]:
    """Run the file with onnxruntime on random normalised images of ``shapes`` ``(N, H, W)``;
    return ``(shape, max |onnxruntime - PyTorch|, max |logit|, share of equal argmax labels)``
    and stop if a difference is over ``tolerance``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(output), options, providers=['CPUExecutionProvider'])
    except Exception as error:  # onnxruntime raises its own Fail, InvalidGraph, ...
        raise SystemExit(f'onnxruntime cannot load {output}: {error}')
    generator = torch.Generator().manual_seed(0)
    results = []
    for batch, height, width in shapes:
        image = torch.randn(batch, 3, height, width, generator=generator)
        with use_backends('torch'), torch.no_grad():
            expected = module(image).numpy()
        try:
            got = session.run([OUTPUT], {INPUT: image.numpy()})[0]
        except Exception as error:
            raise SystemExit(f'onnxruntime cannot run {output} on a {batch}x3x{height}x{width} '
                             f'input: {error}')
        if got.shape != expected.shape:
            raise SystemExit(f'{output} gives {got.shape} for a {batch}x3x{height}x{width} input, '
                             f'PyTorch {expected.shape}')
        diff, scale = float(np.abs(got - expected).max()), float(np.abs(expected).max())
        same_labels = float((got.argmax(1) == expected.argmax(1)).mean())
        results.append(((batch, height, width), diff, scale, same_labels))
        if diff > tolerance:
            raise SystemExit(
                f'{output} (kept for inspection) differs from PyTorch by {diff:.2e}, over '
                f'--tolerance {tolerance:.0e}, for a {batch}x3x{height}x{width} input (logits up to '
                f'{scale:.1f}, labels equal at {100 * same_labels:.2f}% of the pixels; float32 '
                'rounding grows with the logits)')
    return results


def main() -> None:
    args = parse_args()
    require_onnx()
    cfg = load_config(args.config, args.cfg_options)
    # eval() here too: the exporter restores the wrapper's mode, and with it the segmentor's
    model = SegmentorLogits(build_segmentor(cfg, args.config, args.checkpoint)).eval()
    height, width = args.shape
    export(model, torch.randn(1, 3, height, width), args.output, args.opset)
    meta = annotate(args.output, model.segmentor, cfg, args.config, args.checkpoint)
    shapes = [(1, h, w) for h, w in args.verify_shape] if args.verify_shape else \
        default_verify_shapes(height, width)
    results = verify(model, args.output, shapes, args.tolerance)

    size_mb = args.output.stat().st_size / 2**20
    print(f'wrote {args.output} ({size_mb:.1f} MiB, ONNX opset {args.opset}, '
          f'traced at 1x3x{height}x{width})')
    print(f"  input  '{INPUT}'  float32 [batch, 3, height, width]: "
          f"{meta['channel_order'].upper()} image, (pixel - mean) / std with mean {meta['mean']}, "
          f"std {meta['std']}")
    print(f"  output '{OUTPUT}' float32 [batch, {meta['num_classes']}, height, width]: class "
          'logits at the input size (argmax over dim 1: the label map)')
    print('onnxruntime against PyTorch, max |difference| of the logits:')
    for (batch, h, w), diff, scale, same_labels in results:
        print(f'  {batch}x3x{h}x{w}: {diff:.2e} (logits up to {scale:.1f}; argmax labels equal at '
              f'{100 * same_labels:.2f}% of the pixels)')
    print(f'all within --tolerance {args.tolerance:.0e}')


if __name__ == '__main__':
    main()
