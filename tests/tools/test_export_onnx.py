"""``export_onnx``: the toy segmentor as ONNX with dynamic batch, height and width, checked
with onnxruntime at sizes other than the traced one; the SegMAN ops traced alone at sizes where
a size-dependent branch, slice or loop would be baked in; refusals of bad inputs."""
import importlib.util
import json
import re
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from mmseg_segman.models.backbones.segman_encoder import SegMANStage
from mmseg_segman.models.layers import SS2D
from mmseg_segman.ops import neighborhood_attention_2d, use_backends

from ..toy_tools import REPO, TOY_CONFIG, run

TOOL = REPO / 'tools' / 'deployment' / 'export_onnx.py'
spec = importlib.util.spec_from_file_location('export_onnx', TOOL)
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """The toy config, random weights, traced at 64x64 by the tool as a user runs it."""
    out = tmp_path_factory.mktemp('onnx') / 'toy.onnx'
    code, log = run(TOOL, TOY_CONFIG, out, '--shape', 64, 64, cwd=REPO)
    return out, code, log


def test_tool_exports_and_checks_two_other_sizes(exported):
    out, code, log = exported
    assert code == 0, log[-3000:]
    assert 'RANDOMLY INITIALISED' in log and f'wrote {out}' in log
    checked = dict(re.findall(r'^  (\dx3x\d+x\d+): ([\d.e+-]+) \(logits', log, re.M))
    # default sizes: batch 2 at H+32 x W+64, an odd size at 3/4 (neither a multiple of 64)
    assert set(checked) == {'2x3x96x128', '1x3x49x51'}, log[-2000:]
    assert all(float(diff) <= 1e-4 for diff in checked.values()), checked
    assert "input  'input'  float32 [batch, 3, height, width]: RGB image" in log


def test_file_has_dynamic_axes_metadata_and_matches_pytorch_at_a_third_size(exported):
    out, code, log = exported
    assert code == 0, log[-3000:]
    session = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    (inp, ), (outp, ) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape) == ('input', ['batch', 3, 'height', 'width'])
    assert (outp.name, outp.shape) == ('output', ['batch', 5, 'height', 'width'])
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
    assert meta['mean'] == [123.675, 116.28, 103.53] and meta['std'] == [58.395, 57.12, 57.375]
    assert meta['channel_order'] == 'rgb' and meta['num_classes'] == 5
    assert meta['classes'] == ['background', 'disc', 'square', 'triangle', 'bar']
    assert meta['checkpoint'].startswith('none')

    # the same random model (seed 0) in PyTorch, at a size not checked by the tool
    model = tool.SegmentorLogits(tool.build_segmentor(tool.load_config(str(TOY_CONFIG), None),
                                                      str(TOY_CONFIG), None)).eval()
    image = torch.randn(3, 3, 33, 80, generator=torch.Generator().manual_seed(1))
    with use_backends('torch'), torch.no_grad():
        expected = model(image).numpy()
    got = session.run(['output'], {'input': image.numpy()})[0]
    assert got.shape == (3, 5, 33, 80)
    assert np.abs(got - expected).max() <= 1e-4


class NeighborhoodAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.rpb = nn.Parameter(torch.zeros(2, 13, 13))

    def forward(self, x):  # (B, heads, H, W, d) as q, k and v; window 7
        return neighborhood_attention_2d(x, x, x, 7, self.rpb)


# module, the input's dims before and after (H, W), traced (H, W), checked (H, W)s. NA: a
# 24x24 map is whole tiles with every axis longer than the window; the checks have partial
# tiles and axes shorter than the window. SS2D: 24x24 takes the scan's second level of chunks,
# 70x65 its third. Stage 4: traced at its learnt 7x7 tokens, where the bias is not resized.
OPS = {
    'neighborhood attention': (NeighborhoodAttention, ((2, ), (8, )), (24, 24),
                               [(9, 12), (5, 6), (33, 47)]),
    'selective scan (SS2D)': (lambda: SS2D(16), ((16, ), ()), (24, 24), [(9, 12), (70, 65)]),
    'stage 4 (global bias)': (lambda: SegMANStage(32, 1, 2, 7, 64, [0.0], None, True, True, 7),
                              ((32, ), ()), (7, 7), [(5, 6), (9, 12)]),
}


@pytest.mark.parametrize('op', OPS)
def test_op_traced_at_one_size_runs_at_others(op, tmp_path):
    make, (before, after), traced, sizes = OPS[op]
    torch.manual_seed(0)
    module = make().eval()
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0, 0.2)
    out = tmp_path / 'op.onnx'
    tool.export(module, torch.randn(1, *before, *traced, *after), out, opset=17)
    session = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    for size in sizes:
        x = torch.randn(2, *before, *size, *after)
        with use_backends('torch'), torch.no_grad():
            expected = module(x).numpy()
        got = session.run(['output'], {'input': x.numpy()})[0]
        assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-4, (op, size)


def call_tool(monkeypatch, *args):
    """Run the tool's main() in this process (for refusals, which stop before any export)."""
    monkeypatch.setattr(sys, 'argv', ['export_onnx.py', *map(str, args)])
    with pytest.raises(SystemExit) as stop:
        tool.main()
    return stop.value.code


@pytest.mark.parametrize('case', ['no config', 'classifier config', 'no checkpoint', 'not .onnx',
                                  'no onnxruntime'])
def test_refusals_name_the_problem(case, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'model.onnx'
    args, expected = {
        'no config': ([tmp_path / 'nope.py', out], 'nope.py does not exist'),
        'classifier config': ([REPO / 'configs/segman_cls/segman-t_1xb16_toy-64px.py', out],
                              'is not a segmentation config'),
        'no checkpoint': ([TOY_CONFIG, tmp_path / 'missing.pth', out], 'missing.pth does not exist'),
        'not .onnx': ([TOY_CONFIG, tmp_path / 'model.pth'], 'did you forget OUTPUT.onnx'),
        'no onnxruntime': ([TOY_CONFIG, out], 'pip install onnx onnxruntime'),
    }[case]
    if case == 'no onnxruntime':
        monkeypatch.setitem(sys.modules, 'onnxruntime', None)  # import fails as if not installed
    code = call_tool(monkeypatch, *args, '--shape', 32, 32)
    message = str(code) + capsys.readouterr().err
    assert expected in message and code != 0
    assert not out.exists()
