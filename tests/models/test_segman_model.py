"""The whole model against the released one: keys, parameter counts, numerics."""
import pytest
import torch
from mmseg.models import build_segmentor  # noqa: F401  (registers mmseg's modules)
from mmseg.registry import MODELS

import mmseg_segman  # noqa: F401
from mmseg_segman.models import SegMANEncoder, SegMANHead
from mmseg_segman.models.variants import head_widths
from mmseg_segman.ops.dispatch import registered_ops

from ..conftest import official_keys

PARAMS_M = {'t': 6.40, 's': 29.42, 'b': 51.80, 'l': 92.34}


def build_model(size: str, num_classes: int = 150) -> torch.nn.Module:
    """The variant table's ADE20K segmentor of one size (checked against the release here)."""
    encoder = SegMANEncoder(arch=size)
    head = SegMANHead(**head_widths(size, 'ade20k'), num_classes=num_classes)
    model = torch.nn.Module()
    model.backbone, model.decode_head = encoder, head
    return model


@pytest.mark.parametrize('size', ['t', 's', 'b', 'l'])
def test_state_dict_matches_release(size):
    model = build_model(size)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    released = official_keys(size)
    assert sorted(set(ours) - set(released)) == []
    assert sorted(set(released) - set(ours)) == []
    assert {k: s for k, s in ours.items() if released[k] != s} == {}
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert round(params, 2) == PARAMS_M[size]


def test_registered_in_mmseg():
    assert MODELS.get('SegMANEncoder') is SegMANEncoder
    assert MODELS.get('SegMANHead') is SegMANHead


def test_reproduces_released_mini_model(mini_reference):
    ref = mini_reference
    encoder = SegMANEncoder(arch=ref['encoder_kwargs'])
    head = SegMANHead(**ref['decoder_kwargs'])
    model = torch.nn.Module()
    model.backbone, model.decode_head = encoder, head
    model.load_state_dict(ref['state_dict'], strict=True)
    model.eval()
    with torch.no_grad():
        for image, feats_ref, logits_ref in zip(ref['inputs'], ref['encoder_outputs'], ref['logits']):
            feats = encoder(image)
            for i, (f, r) in enumerate(zip(feats, feats_ref)):
                assert f.shape == r.shape
                err = (f - r).abs().max().item()
                assert err <= 1e-4, f'stage {i + 1} output of {tuple(image.shape)}: max error {err}'
            logits = head(feats)
            assert logits.shape == logits_ref.shape
            err = (logits - logits_ref).abs().max().item()
            assert err <= 1e-4, f'logits of {tuple(image.shape)}: max error {err}'


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_low_precision_segmentor_inference(mini_reference, dtype):
    """``model.to(bfloat16)`` / ``.half()``: logits in that dtype, close to float32's."""
    ref = mini_reference
    model = MODELS.build(dict(
        type='EncoderDecoder', backbone=dict(type='SegMANEncoder', arch=ref['encoder_kwargs']),
        decode_head=dict(type='SegMANHead', **ref['decoder_kwargs'])))
    model.load_state_dict(ref['state_dict'], strict=True)
    image = ref['inputs'][0][..., :64, :96]  # small: CPU kernels of these dtypes are slow
    with torch.no_grad():
        expected = model.eval()(image, mode='tensor')
        logits = model.to(dtype)(image.to(dtype), mode='tensor')
    assert logits.dtype == dtype
    scale = expected.abs().max()
    torch.testing.assert_close(logits.float() / scale, expected / scale, rtol=0, atol=0.05)


@pytest.mark.parametrize('training', [True, False])
def test_whole_segmentor_compiles_as_one_graph(training):
    """``torch.compile(fullgraph=True)`` of the segmentor, as the config's ``compile`` runs it:
    no graph break in the encoder, the head or the op dispatch (training mode with its
    backward, and inference), and the eager outputs and gradients."""
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    from ..toy_tools import TOY_CONFIG
    cfg = Config.fromfile(str(TOY_CONFIG)).model
    for part in (cfg.backbone, cfg.decode_head):
        part.norm_cfg = dict(type='BN', requires_grad=True)  # SyncBN needs a process group
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(cfg).train(training)
    compiled = torch.compile(model, fullgraph=True, backend='eager')
    images = torch.randn(2, 3, 64, 64)
    for dispatcher in registered_ops().values():
        dispatcher._logged.clear()  # the compiled run is the first call: no log line in its graph
    results = []
    for run in (compiled, model):
        torch.manual_seed(0)  # the same dropout and drop path draws
        with torch.set_grad_enabled(training):
            logits = run(images, mode='tensor')
        if training:
            logits.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
        results.append([logits.detach(), *grads])
    assert len(results[0]) == len(results[1]) > (100 if training else 0)
    for compiled_value, eager_value in zip(*results):
        torch.testing.assert_close(compiled_value, eager_value, rtol=1e-5, atol=1e-6)


def test_compiles_to_one_graph_of_triton_custom_ops():
    """``torch.compile`` of a tiny encoder and head, Triton backends chosen (Triton's
    interpreter), is one graph in training and in inference, every Triton op is in it as its
    custom op, forward and backward, and with dynamic sizes one graph serves two input sizes
    (compiled_graphs.py, in a subprocess)."""
    from pathlib import Path

    from ..ops.triton_interpreter import assert_checks_pass_in_interpreter
    assert_checks_pass_in_interpreter(str(Path(__file__).with_name('compiled_graphs.py')),
                                      timeout=300)


def test_compiled_training_of_triton_custom_ops_matches_eager():
    """A tiny encoder and head, Triton backends chosen and run (Triton's interpreter), one
    training step compiled through AOTAutograd and one eagerly: the loss and every parameter's
    gradient agree (compiled_training.py, in a subprocess; a 1% error in the custom ops'
    compiled gradients fails it)."""
    from pathlib import Path

    from ..ops.triton_interpreter import assert_checks_pass_in_interpreter
    assert_checks_pass_in_interpreter(str(Path(__file__).with_name('compiled_training.py')),
                                      timeout=900)
