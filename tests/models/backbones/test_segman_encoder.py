import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mmseg_segman.models import SegMANEncoder
from mmseg_segman.models.backbones import stage_prefix
from mmseg_segman.models.variants import ENCODER_ARCHS

from ...conftest import captured_log

TINY = dict(embed_dims=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4],
            window_size=[5, 5, 3, 3], mlp_ratios=[2, 2, 2, 2], layerscales=[True] * 4)


@pytest.mark.parametrize('size', ['t', 's', 'b', 'l'])
def test_output_shapes_every_size(size):
    encoder = SegMANEncoder(arch=size).eval()
    with torch.no_grad():
        outs = encoder(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [
        (1, c, 64 // s, 96 // s) for c, s in zip(ENCODER_ARCHS[size]['embed_dims'], (4, 8, 16, 32))]


def stride_sizes(height, width):
    """Map sizes after each stage: every stride-2 conv (padding 1) rounds up."""
    sizes = []
    for i in range(5):
        height, width = (height + 1) // 2, (width + 1) // 2
        if i:
            sizes.append((height, width))
    return sizes


@pytest.mark.parametrize('height,width', [(33, 47), (20, 20), (7, 9), (128, 40)])
def test_any_input_size_trains(height, width):
    """Sizes not divisible by 32 and maps smaller than a stage's window."""
    encoder = SegMANEncoder(arch=TINY, drop_path_rate=0.1).train()
    x = torch.randn(2, 3, height, width, requires_grad=True)
    outs = encoder(x)
    for out, dim, (h, w) in zip(outs, TINY['embed_dims'], stride_sizes(height, width)):
        assert out.shape == (2, dim, h, w)
    sum(o.sum() for o in outs).backward()
    assert torch.isfinite(x.grad).all()


def test_out_indices_and_batch_one():
    encoder = SegMANEncoder(arch=TINY, out_indices=(1, 3)).train()
    outs = encoder(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == encoder.out_channels == [16, 32]


def test_with_cp_gives_same_outputs_and_gradients():
    torch.manual_seed(0)
    plain = SegMANEncoder(arch=TINY)
    checkpointed = SegMANEncoder(arch=TINY, with_cp=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 40, 40)
    grads = []
    for model in (plain, checkpointed):
        model.eval()
        model.zero_grad()
        sum(o.square().sum() for o in model(x.clone().requires_grad_())).backward()
        grads.append(model.stages[0].blocks[0].token_mixer.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_drop_path_is_linear_over_all_blocks():
    encoder = SegMANEncoder(arch='t', drop_path_rate=0.3)
    rates = [getattr(b.drop_path, 'drop_prob', 0.0) for stage in encoder.stages for b in stage.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 10))


@pytest.mark.parametrize('bad,error,match', [
    (torch.randn(3, 32, 32), ValueError, r'\(B, C, H, W\)'),
    (torch.randn(1, 4, 32, 32), ValueError, '3 input channels, got 4'),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, 'floating-point'),
    (torch.zeros(1, 3, 0, 0), ValueError, r'empty image batch \(1, 3, 0, 0\)'),
])
def test_bad_input_is_named(bad, error, match):
    with pytest.raises(error, match=match):
        SegMANEncoder(arch=TINY)(bad)


class ScalarReads(TorchDispatchMode):
    """Counts tensor -> Python scalar reads (``aten._local_scalar_dense``: ``.item()``,
    ``bool(t)``, ``if t:``), each a host synchronisation on a GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('check_finite', [False, True])
def test_forward_reads_values_back_only_with_check_finite(check_finite):
    encoder = SegMANEncoder(arch=TINY, check_finite=check_finite).eval()
    with torch.no_grad(), ScalarReads() as reads:
        encoder(torch.randn(1, 3, 32, 32))
    assert (reads.count > 0) == check_finite, reads.count


@pytest.mark.parametrize('value,match', [
    (float('nan'), 'input contains NaN or Inf'),
    (float('inf'), 'input contains NaN or Inf'),
    (1e30, 'stage 1 output has NaN/Inf from a finite input'),
])
def test_check_finite_names_bad_values(value, match):
    image = torch.randn(1, 3, 32, 32)
    image[0, 0, 3, 5] = value
    encoder = SegMANEncoder(arch=TINY, check_finite=True).eval()
    with pytest.raises(ValueError, match=match):
        encoder(image)
    encoder.check_finite = False  # off (the default): no error, and 1e30 overflows to NaN
    assert not all(torch.isfinite(o).all() for o in encoder(image))


def test_bad_arch_is_named():
    with pytest.raises(ValueError, match="unknown SegMAN arch 'xl'"):
        SegMANEncoder(arch='xl')
    with pytest.raises(ValueError, match=r"missing keys \['depths'\]"):
        SegMANEncoder(arch={k: v for k, v in TINY.items() if k != 'depths'})
    with pytest.raises(ValueError, match=r"unknown keys \['window'\]"):
        SegMANEncoder(arch={**TINY, 'window': [3] * 4})
    with pytest.raises(ValueError, match='window_dilation 1'):
        SegMANEncoder(arch={**TINY, 'window_dilation': [2] * 4})
    with pytest.raises(ValueError, match='out_indices'):
        SegMANEncoder(arch=TINY, out_indices=(4,))


@pytest.mark.parametrize('change,match', [
    (dict(num_heads=[0, 2, 2, 4]), r"'num_heads' must be positive integers, got \[0, 2, 2, 4\]"),
    (dict(embed_dims=64), r"'embed_dims' needs 4 values \(one per stage\), got 64"),
    (dict(depths=[1, -1, 1, 1]), r"'depths' must be positive integers"),
    (dict(window_size=[5, 5, 3.0, 3]), r"'window_size' must be positive integers"),
    (dict(mlp_ratios=[2, 0, 2, 2]), r"'mlp_ratios' must be positive numbers"),
])
def test_bad_arch_values_are_named(change, match):
    with pytest.raises(ValueError, match=match):
        SegMANEncoder(arch={**TINY, **change})


@pytest.mark.parametrize('in_channels', [0, -3, 3.0])
def test_bad_in_channels_is_named(in_channels):
    with pytest.raises(ValueError, match=f'in_channels must be a positive integer, got {in_channels}'):
        SegMANEncoder(arch=TINY, in_channels=in_channels)


@pytest.mark.parametrize('init_cfg,unknown', [
    (dict(type='Pretrained', checkpont='x.pth'), "\\['checkpont'\\]"),
    (dict(type='Pretrained', checkpoint='x.pth', prefx='backbone.'), "\\['prefx'\\]"),
])
def test_pretrained_init_cfg_typo_is_named_at_build(init_cfg, unknown):
    with pytest.raises(ValueError, match=f"takes 'checkpoint' .*unknown {unknown}"):
        SegMANEncoder(arch=TINY, init_cfg=init_cfg)


def test_stage_layout_keeps_the_release_keys():
    encoder = SegMANEncoder(arch=TINY)
    for i, stage in enumerate(encoder.stages):
        assert encoder.get_submodule(stage_prefix(i)) is stage
        assert stage.blocks[0].cpe1.weight.shape[0] == TINY['embed_dims'][i]
    keys = encoder.state_dict()
    assert [f'{stage_prefix(i)}.rope.angle' in keys for i in range(4)] == [True] * 4
    assert [d[0].weight.shape[:2] for d in encoder.downsamples] == [(16, 8), (24, 16), (32, 24)]
    assert [encoder.get_submodule(f'layers.{2 * i + 1}') for i in range(3)] == encoder.downsamples


def test_every_convolution_runs_an_op():
    # cuDNN builds an execution plan for each new input shape (about 3 ms a convolution on an
    # H100); the stem's and the downsampling convolutions run dense_conv2d
    encoder = SegMANEncoder(arch=TINY)
    assert not [name for name, m in encoder.named_modules() if type(m) is nn.Conv2d]
    assert {type(m).__name__ for m in (encoder.patch_embed[0], encoder.downsamples[0][0])} \
        == {'DenseConv2d'}


def batch_norms(encoder):
    return [(name, type(m)) for name, m in encoder.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_norm_cfg_builds_every_encoder_norm_with_the_release_keys():
    torch.manual_seed(0)
    plain = SegMANEncoder(arch=TINY)
    synced = SegMANEncoder(arch=TINY, norm_cfg=dict(type='SyncBN', requires_grad=True))
    names = [name for name, _ in batch_norms(plain)]
    # stem (4), downsamples (3), the LASS dwconv of stages 1-3 (one block each)
    assert len(names) == 10 and {type(m) for m in plain.modules()} >= {nn.BatchNorm2d}
    synced_norms = batch_norms(synced)
    assert [name for name, _ in synced_norms] == names
    assert all(issubclass(kind, nn.SyncBatchNorm) for _, kind in synced_norms)
    assert list(synced.state_dict()) == list(plain.state_dict())
    synced.load_state_dict(plain.state_dict(), strict=True)
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(plain.eval()(image), synced.eval()(image)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    frozen = SegMANEncoder(arch=TINY, norm_cfg=dict(type='BN', requires_grad=False))
    assert not frozen.patch_embed[1].weight.requires_grad


def test_act_cfg_sets_the_stem_and_ffn_activations():
    encoder = SegMANEncoder(arch=TINY, act_cfg=dict(type='ReLU'))
    activations = {type(m) for m in encoder.modules() if isinstance(m, (nn.ReLU, nn.GELU))}
    assert activations == {nn.ReLU}
    assert isinstance(encoder.patch_embed[2], nn.ReLU) and isinstance(encoder.stages[3].blocks[0].mlp.act, nn.ReLU)
    assert isinstance(SegMANEncoder(arch=TINY).stages[0].blocks[0].mlp.act, nn.GELU)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_low_precision_inference(dtype):
    torch.manual_seed(0)
    encoder = SegMANEncoder(arch=TINY).eval()
    image = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        expected = encoder(image)
        outs = encoder.to(dtype)(image.to(dtype))
    for out, ref in zip(outs, expected):
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


def imagenet_checkpoint(encoder, path, ema=True):
    """A file in the layout of the released ImageNet encoders (timm train script)."""
    state = dict(encoder.state_dict())
    state['classifier.0.weight'] = torch.randn(1024, encoder.embed_dims[-1], 1, 1)
    state['classifier.4.weight'] = torch.randn(1000, 1024, 1, 1)
    ckpt = {'epoch': 300, 'arch': 'SegMANEncoder_t', 'state_dict': state}
    if ema:
        ckpt['state_dict_ema'] = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(ckpt, path)
    return ckpt


@pytest.mark.parametrize('ema', [True, False])
def test_init_cfg_loads_imagenet_encoder(tmp_path, ema):
    source = SegMANEncoder(arch=TINY)
    ckpt = imagenet_checkpoint(source, tmp_path / 'in1k.pth', ema=ema)
    encoder = SegMANEncoder(arch=TINY, init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'in1k.pth')))
    with captured_log() as records:
        encoder.init_weights()
    log = '\n'.join(r.getMessage() for r in records)
    assert f"({'state_dict_ema' if ema else 'state_dict'}); ignored 2 classifier keys" in log, log
    expected = ckpt['state_dict_ema' if ema else 'state_dict']
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_loads_backbone_of_segmentor_checkpoint(tmp_path):
    source = SegMANEncoder(arch=TINY)
    state = {f'backbone.{k}': v for k, v in source.state_dict().items()}
    state['decode_head.conv_seg.weight'] = torch.zeros(3, 3, 1, 1)
    torch.save({'meta': {}, 'state_dict': state}, tmp_path / 'seg.pth')
    encoder = SegMANEncoder(arch=TINY)
    encoder.load_pretrained(str(tmp_path / 'seg.pth'))
    assert torch.equal(encoder.stages[0].blocks[0].cpe1.weight, source.stages[0].blocks[0].cpe1.weight)


def test_checkpoint_of_another_size_is_refused(tmp_path):
    imagenet_checkpoint(SegMANEncoder(arch='t'), tmp_path / 't.pth')
    encoder = SegMANEncoder(arch='s', init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 't.pth')))
    with pytest.raises(ValueError, match='another SegMAN size'):
        encoder.init_weights()


def test_missing_checkpoint_is_named(tmp_path):
    encoder = SegMANEncoder(arch=TINY, init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'nope.pth')))
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        encoder.init_weights()


@pytest.mark.parametrize('out_size', [1, 3, 37, 256, 500, 2048])
def test_bicubic_matrix_resizes_as_f_interpolate(out_size):
    """The stage-4 bias resize (two matrix products) against ``F.interpolate``, up and down:
    within the float32 rounding of the source coordinates, which both compute in float32."""
    from mmseg_segman.ops.resize import bicubic_matrix
    bias = torch.randn(4, 49, 49, generator=torch.Generator().manual_seed(0))
    want = torch.nn.functional.interpolate(bias[None], size=(out_size, out_size), mode='bicubic',
                                           align_corners=False)[0]
    resize = bicubic_matrix(49, out_size, dtype=bias.dtype, device=bias.device)
    got = resize @ bias @ resize.t()
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_runs_on_the_meta_device():
    """Shapes without data (deferred initialisation, memory estimates): the stage-4 bias
    resize must not ask for autocast on a device that has none."""
    encoder = SegMANEncoder(TINY).to('meta')
    outs = encoder(torch.empty(1, 3, 64, 96, device='meta'))
    assert [tuple(o.shape) for o in outs] == [(1, 8, 16, 24), (1, 16, 8, 12), (1, 24, 4, 6), (1, 32, 2, 3)]


def test_the_bias_resize_keeps_float32_under_autocast_without_asking_torch_each_call(monkeypatch):
    """Autocast is switched off around the stage-4 bias resize (float32 products under bf16
    autocast) through a set of device types probed once: torch 2.11's dynamo cannot trace
    ``torch.amp.is_autocast_available`` (a graph break in the compiled segmentor)."""
    def not_traceable(device_type):
        raise AssertionError('torch.amp.is_autocast_available called in a forward')
    monkeypatch.setattr(torch.amp, 'is_autocast_available', not_traceable)
    lass = SegMANEncoder(TINY).layers[-1].blocks[0].token_mixer
    with torch.autocast('cpu', dtype=torch.bfloat16):
        bias = lass._global_bias(36)
    assert bias.shape == (lass.num_heads, 36, 36) and bias.dtype == torch.float32


def test_lass_convolution_takes_its_eval_norm_into_the_op(monkeypatch):
    # in eval mode the batch norm after LASS's depthwise conv (and the SiLU) run inside the
    # convolution's op (one pass on the fast path); in training the norm's batch statistics
    # run as the module; both give silu(dwconv(y))
    import torch.nn.functional as F

    from mmseg_segman.models.backbones import segman_encoder
    from mmseg_segman.models.backbones.segman_encoder import LASS
    lass = LASS(8, 2, 3)
    norm = lass.dwconv[1]
    norm.running_mean.uniform_(-1, 1)
    norm.running_var.uniform_(0.5, 2)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    y = torch.randn(2, 8, 5, 6)
    calls = []
    op = segman_encoder.depthwise_conv2d

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return op(*args, **kwargs)

    monkeypatch.setattr(segman_encoder, 'depthwise_conv2d', recording)
    for training in (False, True):
        lass.train(training)
        with torch.no_grad():
            torch.testing.assert_close(lass._dwconv_silu(y), F.silu(lass.dwconv(y)))
    assert [call.get('activation') for call in calls] == ['silu']


@pytest.mark.parametrize('kernel_size, planar', [(11, True), (9, False), (7, False)])
def test_lass_asks_for_queries_and_keys_in_the_layout_the_attention_reads_fastest(
        monkeypatch, kernel_size, planar):
    # windows of 11 (the first stage of every released size): the rotated q and k as planes;
    # of 9 and 7 as contiguous head vectors
    from mmseg_segman.models.backbones import segman_encoder
    from mmseg_segman.models.backbones.segman_encoder import LASS
    lass = LASS(8, 2, kernel_size).eval()
    requests = []
    op = segman_encoder.rotary_embedding_2d

    def recording(*args, **kwargs):
        requests.append(kwargs['planar'])
        return op(*args, **kwargs)

    monkeypatch.setattr(segman_encoder, 'rotary_embedding_2d', recording)
    x = torch.randn(1, 8, kernel_size + 2, kernel_size + 1)
    sin, cos = segman_encoder.RoPE2d(4)(x.shape[-2:])
    with torch.no_grad():
        lass(x, sin, cos)
    assert requests == [planar]
