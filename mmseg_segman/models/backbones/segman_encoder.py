"""SegMAN encoder: a four-stage hierarchy of LASS blocks (local attention + state space)."""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmcv.cnn import build_activation_layer, build_norm_layer
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.runner.checkpoint import CheckpointLoader
from mmseg.registry import MODELS
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ...ops import (biased_attention, depthwise_conv2d, neighborhood_attention_2d,
                    rotary_embedding_2d)
from ...ops.batch_norm import trains_with_batch_statistics
from ...ops.depthwise_conv import RunningBatchNorm
from ...ops.dispatch import (autocast_off, check_op_backends, recompute_in_current_scope,
                             with_op_backends)
from ...ops.neighborhood_attention import reads_planes_faster
from ...ops.pointwise_conv import Residual
from ...ops.resize import bicubic_matrix
from ..layers import (SS2D, ConvNormSequence, DenseConv2d, DepthwiseConv2d, LayerNorm2d,
                      PointwiseConv2d, RoPE2d, SegMANBlock)
from ..layers.norm import batch_norm_with_statistics
from ..strict_loading import WeightsMismatchError, refuse_mismatched_weights
from ..cuda_graphs import CUDAGraphs
from ..variants import ENCODER_ARCHS

NUM_STAGES = 4


def layer_index(stage: int, downsample: bool = False) -> int:
    """Index in ``SegMANEncoder.layers`` of stage ``stage`` (0-3), or of the stride-2
    conv after it: the release interleaves them in one list, so stage i has the keys
    ``layers.{2i}.*`` and its downsample ``layers.{2i+1}.*``."""
    return 2 * stage + int(downsample)


def stage_prefix(stage: int) -> str:
    """State-dict prefix of stage ``stage`` in the encoder: ``'layers.{2 * stage}'``."""
    return f'layers.{layer_index(stage)}'


class LASS(nn.Module):
    """Local-Attention-and-State-Space token mixer.

    Stages 1-3: neighborhood attention (with RoPE and relative position bias), then a
    selective scan over its output: ``y = NA(q, k, v); y = norm(ssm(silu(dwconv(y)))) + y``.
    Stage 4 (``global_mode``): the NA output is the value of one global attention whose
    bias ``rpb.1`` is learnt for ``global_bias_size**2`` tokens and resized bicubically.
    Both end with ``proj(y + lepe(v))``.

    Args:
        embed_dim: channels ``C``.
        num_heads: attention heads.
        kernel_size: neighborhood attention window (odd).
        use_rpb: learn relative position biases.
        global_mode: stage-4 mode (no selective scan, global attention).
        global_bias_size: side of the token grid ``rpb.1`` was learnt for (7 for 224 inputs).
        norm_cfg: the norm after ``dwconv`` (mmcv ``build_norm_layer``).
    """

    def __init__(self, embed_dim: int, num_heads: int, kernel_size: int, use_rpb: bool = True,
                 global_mode: bool = False, global_bias_size: int = 7,
                 norm_cfg: Dict = dict(type='BN', requires_grad=True)):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f'embed_dim {embed_dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.kernel_size = kernel_size
        self.global_mode = global_mode

        self.qkv = PointwiseConv2d(embed_dim, embed_dim * 3)
        self.lepe = DepthwiseConv2d(embed_dim, 5)
        self.proj = PointwiseConv2d(embed_dim, embed_dim)
        if not global_mode:
            self.dwconv = nn.Sequential(
                DepthwiseConv2d(embed_dim, 3),
                build_norm_layer(norm_cfg, embed_dim)[1])
            self.ssm = SS2D(embed_dim)
            self.norm = LayerNorm2d(embed_dim)
        if use_rpb:
            span = 2 * kernel_size - 1
            biases = [nn.Parameter(torch.zeros(num_heads, span, span))]
            if global_mode:
                tokens = global_bias_size ** 2
                biases.append(nn.Parameter(torch.zeros(num_heads, tokens, tokens)))
            self.rpb = nn.ParameterList(biases)
        else:
            self.rpb = None

    def _global_bias(self, length: int) -> Optional[Tensor]:
        if self.rpb is None:
            return None
        bias = self.rpb[1]
        # an exported graph resizes at every size (to the learnt size, bicubic is the identity)
        if torch.onnx.is_in_onnx_export():
            return F.interpolate(bias[None], size=(length, length), mode='bicubic',
                                 align_corners=False)[0]
        if bias.shape[-1] == length:
            return bias
        # as F.interpolate, by two matrix products (2.5x as fast at 2048 tokens on the CPU), in
        # the bias's dtype under autocast too
        resize = bicubic_matrix(bias.shape[-1], length, dtype=bias.dtype, device=bias.device)
        with autocast_off(bias.device.type):
            return resize @ bias @ resize.t()

    def _dwconv_silu(self, y: Tensor) -> Tensor:
        """``silu(dwconv(y))``: a batch norm in eval mode runs in the convolution's op (one
        pass on the fast path, where the norm and the activation took two more); in training
        mode the norm and the activation are one op (as ``_BatchNorm.forward`` but for
        ``SyncBatchNorm``, which stays a module)."""
        conv, norm = self.dwconv
        running = RunningBatchNorm.in_eval(norm)
        if running is not None:
            return depthwise_conv2d(y, conv.weight, conv.bias, norm=running, activation='silu')
        if trains_with_batch_statistics(norm):
            return batch_norm_with_statistics(norm, conv(y), 'silu')
        return F.silu(self.dwconv(y))

    def _attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Neighborhood attention of ``(B, heads, H, W, head_dim)`` queries, keys and values
        (rotated ``q`` and ``k``), then in global mode the global attention with its result
        as the values: ``(B, heads, H, W, head_dim)``, or ``(B, heads, H * W, head_dim)`` in
        global mode."""
        y = neighborhood_attention_2d(q, k, v, self.kernel_size,
                                      None if self.rpb is None else self.rpb[0])
        if not self.global_mode:
            return y
        batch, heads, height, width, head_dim = q.shape
        tokens = height * width
        return biased_attention(q.reshape(batch, heads, tokens, head_dim),
                                k.reshape(batch, heads, tokens, head_dim),
                                y.reshape(batch, heads, tokens, head_dim), self._global_bias(tokens))

    def forward(self, x: Tensor, sin: Tensor, cos: Tensor,
                residual: Optional[Residual] = None) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``; ``sin``/``cos`` ``(H, W, head_dim)`` from RoPE2d;
        ``residual`` is added by ``proj``'s op."""
        batch, channels, height, width = x.shape
        # three (B, C, H, W) views of qkv: the backward pass concatenates their gradients
        # (one kernel; a slice each would zero-fill and copy a map of 3C channels each); v's
        # joins lepe's before
        q, k, v = self.qkv(x).split(channels, dim=1)
        lepe = self.lepe(v)
        q, k, v = (t.view(batch, self.num_heads, self.head_dim, height, width).permute(0, 1, 3, 4, 2)
                   for t in (q, k, v))  # each (B, heads, H, W, head_dim)
        q, k = rotary_embedding_2d(q, k, sin, cos, q_scale=self.scale,
                                   planar=reads_planes_faster(self.kernel_size))
        y = self._attention(q, k, v)
        if self.global_mode:
            y = y.transpose(-1, -2).reshape(batch, channels, height, width) + lepe
        else:
            y = y.permute(0, 1, 4, 2, 3).reshape(batch, channels, height, width)
            # norm(ssm(.)) + y + lepe: the sums in the norm's pass on the fast path
            y = self.norm(self.ssm(self._dwconv_silu(y)), y, lepe)
        return self.proj(y, residual=residual)


class SegMANStage(nn.Module):
    """One encoder stage: a shared RoPE table and ``depth`` SegMAN blocks with LASS mixers."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, kernel_size: int,
                 ffn_dim: int, drop_paths: Sequence[float], layer_scale_init: Optional[float],
                 use_rpb: bool, global_mode: bool, global_bias_size: int, with_cp: bool = False,
                 norm_cfg: Dict = dict(type='BN', requires_grad=True),
                 act_cfg: Dict = dict(type='GELU')):
        super().__init__()
        self.with_cp = with_cp
        self.rope = RoPE2d(embed_dim // num_heads)
        self.blocks = nn.ModuleList([
            SegMANBlock(embed_dim,
                        LASS(embed_dim, num_heads, kernel_size, use_rpb, global_mode, global_bias_size,
                             norm_cfg),
                        ffn_dim, drop_paths[i], layer_scale_init, act_cfg) for i in range(depth)
        ])

    def forward(self, x: Tensor) -> Tensor:
        sin, cos = self.rope(x.shape[-2:])
        for block in self.blocks:
            if self.with_cp and x.requires_grad:
                x = cp.checkpoint(block, x, sin, cos, use_reentrant=False,
                                  context_fn=recompute_in_current_scope)
            else:
                x = block(x, sin, cos)
        return x


def conv_norm(in_channels: int, out_channels: int, stride: int, norm_cfg: Dict) -> List[nn.Module]:
    """A 3x3 conv without bias and its norm (keys ``i``, ``i + 1`` in a Sequential)."""
    return [DenseConv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            build_norm_layer(norm_cfg, out_channels)[1]]


def stem(in_channels: int, embed_dim: int, norm_cfg: Dict, act_cfg: Dict) -> ConvNormSequence:
    """Four 3x3 conv-norm layers (activation between), stride 4 in all; keys ``0..10``."""
    half = embed_dim // 2
    widths = [(in_channels, half, 2), (half, half, 1), (half, embed_dim, 2), (embed_dim, embed_dim, 1)]
    layers = []
    for i, (cin, cout, stride) in enumerate(widths):
        if i:
            layers.append(build_activation_layer(act_cfg))
        layers += conv_norm(cin, cout, stride, norm_cfg)
    return ConvNormSequence(*layers)


@MODELS.register_module()
class SegMANEncoder(BaseModule):
    """SegMAN encoder (Fu et al., CVPR 2025): features at strides 4, 8, 16, 32.

    Args:
        arch: ``'t'``, ``'s'``, ``'b'``, ``'l'`` (settings in
            :data:`mmseg_segman.models.variants.ENCODER_ARCHS`), or a dict with
            ``embed_dims``, ``depths``, ``num_heads``, ``window_size`` and ``mlp_ratios``
            (4 values each) and optionally ``layerscales`` (4 bools, default all False),
            ``layer_init_values`` (1e-6), ``use_rpb`` (True), ``window_dilation`` (only 1),
            ``global_bias_size`` (7).
        in_channels: image channels.
        out_indices: stages whose outputs are returned.
        drop_path_rate: stochastic depth, linear over all blocks up to this rate.
        with_cp: gradient checkpointing of every block (saves memory, costs a recompute).
        norm_cfg: the norms of the stem, the downsampling convs and the LASS ``dwconv``
            (BN as released; ``dict(type='SyncBN')`` for synchronised statistics).
        act_cfg: the activations of the stem and the blocks' FFNs (GELU as released).
        check_finite: debug switch: refuse inputs with NaN/Inf, and stage outputs that
            overflow to NaN/Inf from finite inputs (such as magnitudes near 1e30). Each
            check reads a value back to the host (a GPU sync, a ``torch.compile`` graph
            break), so it is off by default.
        op_backends: ``{op: backend}`` for this encoder's forward (see ``mmseg_segman.ops.dispatch``).
        cuda_graph: replay the forward as CUDA graphs (:mod:`mmseg_segman.models.cuda_graphs`):
            the same numbers without the host's work per kernel. In training, each step's
            forward and backward, captured at the first step, for inputs of one shape (a
            second shape turns it off, with a log line); in inference, a graph for each input
            size met twice, at most 8 sizes (others run eagerly). Off, with a log line, under
            ``with_cp`` or ``check_finite``.
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH)`` (optionally ``prefix``) loads
            ImageNet encoder weights (``state_dict_ema``, else ``state_dict``; classifier
            keys are ignored).
    """

    arch_zoo = ENCODER_ARCHS
    _required = ('embed_dims', 'depths', 'num_heads', 'window_size', 'mlp_ratios')
    _optional = dict(layerscales=[False] * NUM_STAGES, layer_init_values=1e-6, use_rpb=True,
                     window_dilation=[1] * NUM_STAGES, global_bias_size=7)
    _pretrained_keys = ('type', 'checkpoint', 'prefix')

    def __init__(self, arch: Union[str, Dict] = 't', in_channels: int = 3,
                 out_indices: Sequence[int] = (0, 1, 2, 3), drop_path_rate: float = 0.0,
                 with_cp: bool = False, norm_cfg: Dict = dict(type='BN', requires_grad=True),
                 act_cfg: Dict = dict(type='GELU'), check_finite: bool = False,
                 op_backends: Optional[Dict[str, str]] = None, cuda_graph: bool = False,
                 init_cfg: Optional[Dict] = None):
        self._check_init_cfg(init_cfg)
        super().__init__(init_cfg=init_cfg)
        self.arch = self._parse_arch(arch)
        if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
            raise ValueError(f'in_channels must be a positive integer, got {in_channels!r}')
        self.in_channels = in_channels
        self.out_indices = tuple(out_indices)
        if not self.out_indices or any(i not in range(NUM_STAGES) for i in self.out_indices):
            raise ValueError(f'out_indices must be stage indices in 0..3, got {out_indices}')
        self.check_finite = check_finite
        self.op_backends = check_op_backends(op_backends, 'SegMANEncoder')
        self.cuda_graphs = None
        if cuda_graph and (with_cp or check_finite):
            print_log(f'SegMANEncoder: cuda_graph is off: {"with_cp" if with_cp else "check_finite"} '
                      'is set (the graphs hold neither recomputation nor host checks)',
                      logger='current')
        elif cuda_graph:
            self.cuda_graphs = CUDAGraphs('SegMANEncoder')

        a = self.arch
        dims = a['embed_dims']
        self.embed_dims = list(dims)
        self.patch_embed = stem(in_channels, dims[0], norm_cfg, act_cfg)
        drop_paths = torch.linspace(0, drop_path_rate, sum(a['depths'])).tolist()
        layers = {}
        for i in range(NUM_STAGES):
            first = sum(a['depths'][:i])
            layers[layer_index(i)] = SegMANStage(
                embed_dim=dims[i], depth=a['depths'][i], num_heads=a['num_heads'][i],
                kernel_size=a['window_size'][i], ffn_dim=int(a['mlp_ratios'][i] * dims[i]),
                drop_paths=drop_paths[first:first + a['depths'][i]],
                layer_scale_init=a['layer_init_values'] if a['layerscales'][i] else None,
                use_rpb=a['use_rpb'], global_mode=(i == NUM_STAGES - 1),
                global_bias_size=a['global_bias_size'], with_cp=with_cp, norm_cfg=norm_cfg,
                act_cfg=act_cfg)
            if i < NUM_STAGES - 1:
                layers[layer_index(i, downsample=True)] = ConvNormSequence(
                    *conv_norm(dims[i], dims[i + 1], 2, norm_cfg))
        self.layers = nn.ModuleList([layers[j] for j in sorted(layers)])
        self.apply(self._init_module)
        self.register_load_state_dict_pre_hook(refuse_mismatched_weights)

    @property
    def out_channels(self) -> List[int]:
        """Channels of the maps ``forward`` returns, in order (``embed_dims`` at ``out_indices``)."""
        return [dim for i, dim in enumerate(self.embed_dims) if i in self.out_indices]

    @property
    def stages(self) -> List[SegMANStage]:
        """The four stages, in order."""
        return [self.layers[layer_index(i)] for i in range(NUM_STAGES)]

    @property
    def downsamples(self) -> List[nn.Module]:
        """The three stride-2 conv-norm pairs; ``downsamples[i]`` follows ``stages[i]``."""
        return [self.layers[layer_index(i, downsample=True)] for i in range(NUM_STAGES - 1)]

    @classmethod
    def _check_init_cfg(cls, init_cfg) -> None:
        if isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained':
            unknown = sorted(k for k in init_cfg if k not in cls._pretrained_keys)
            if unknown or 'checkpoint' not in init_cfg:
                raise ValueError(
                    f"SegMANEncoder init_cfg=dict(type='Pretrained', ...) takes 'checkpoint' "
                    f"(required) and 'prefix'; got keys {sorted(init_cfg)}, unknown {unknown}")

    @classmethod
    def _parse_arch(cls, arch: Union[str, Dict]) -> Dict:
        if isinstance(arch, str):
            if arch.lower() not in cls.arch_zoo:
                raise ValueError(f'unknown SegMAN arch {arch!r}; choose one of '
                                 f'{sorted(cls.arch_zoo)} or pass a dict of settings')
            arch = cls.arch_zoo[arch.lower()]
        if not isinstance(arch, dict):
            raise TypeError(f'arch must be a name or a dict, got {type(arch).__name__}')
        missing = [k for k in cls._required if k not in arch]
        unknown = [k for k in arch if k not in cls._required and k not in cls._optional]
        if missing or unknown:
            raise ValueError(f'arch dict: missing keys {missing}, unknown keys {unknown}; '
                             f'expected {list(cls._required)} plus optional {list(cls._optional)}')
        settings = {**cls._optional, **arch}
        for key in cls._required + ('layerscales', 'window_dilation'):
            if not isinstance(settings[key], (list, tuple)) or len(settings[key]) != NUM_STAGES:
                raise ValueError(f'arch {key!r} needs 4 values (one per stage), got {settings[key]!r}')
        for key in ('embed_dims', 'depths', 'num_heads', 'window_size'):
            if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in settings[key]):
                raise ValueError(f'arch {key!r} must be positive integers, got {settings[key]}')
        if any(not isinstance(r, (int, float)) or r <= 0 for r in settings['mlp_ratios']):
            raise ValueError(f"arch 'mlp_ratios' must be positive numbers, got {settings['mlp_ratios']}")
        if any(d != 1 for d in settings['window_dilation']):
            raise ValueError('SegMANEncoder supports window_dilation 1 only, '
                             f'got {settings["window_dilation"]}')
        if any(k % 2 == 0 for k in settings['window_size']):
            raise ValueError(f'window sizes must be odd, got {settings["window_size"]}')
        return settings

    @staticmethod
    def _init_module(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm, _BatchNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def init_weights(self) -> None:
        if isinstance(self.init_cfg, dict) and self.init_cfg.get('type') == 'Pretrained':
            self.load_pretrained(self.init_cfg['checkpoint'], self.init_cfg.get('prefix'))
            self._is_init = True
        else:
            super().init_weights()

    def load_pretrained(self, checkpoint: str, prefix: Optional[str] = None) -> None:
        """Load encoder weights from an ImageNet or mmseg/mmpretrain checkpoint, strictly.

        Takes ``state_dict_ema``, else ``state_dict``, else the file's top-level dict;
        drops ``module.``; keeps only keys under ``prefix`` (default: ``backbone.`` when
        present) and ignores the classifier (``classifier.*``, ``head.*``).
        """
        ckpt = CheckpointLoader.load_checkpoint(checkpoint, map_location='cpu')
        source = next((k for k in ('state_dict_ema', 'state_dict') if k in ckpt), None)
        state = ckpt[source] if source else ckpt
        state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
        if prefix is None and any(k.startswith('backbone.') for k in state):
            prefix = 'backbone.'
        if prefix:
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        ignored = [k for k in state if k.split('.')[0] in ('classifier', 'head')]
        state = {k: v for k, v in state.items() if k not in ignored}
        self.load_encoder_state(state, checkpoint)
        print_log(f'SegMANEncoder: loaded {len(state)} tensors from {checkpoint} '
                  f'({source or "top-level dict"}); ignored {len(ignored)} classifier keys',
                  logger='current')

    def load_encoder_state(self, state: Dict[str, Tensor], source: str = 'state dict') -> None:
        """``load_state_dict(strict=True)`` with an error that names what does not fit."""
        try:
            self.load_state_dict(state, strict=True)
        except WeightsMismatchError as error:
            raise WeightsMismatchError(f'{source}: {error}') from None

    @with_op_backends
    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """``(B, in_channels, H, W)`` -> stage outputs ``(B, C_i, H/2^(i+2), W/2^(i+2))``.

        Shape, channels and dtype are checked always (metadata, free); values only with
        ``check_finite``."""
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError('SegMANEncoder expects a (B, C, H, W) tensor, got '
                             f'{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}')
        if x.size(1) != self.in_channels:
            raise ValueError(f'SegMANEncoder was built for {self.in_channels} input channels, '
                             f'got {x.size(1)} (input shape {tuple(x.shape)})')
        if x.numel() == 0:
            raise ValueError(f'SegMANEncoder got an empty image batch {tuple(x.shape)}')
        if not x.is_floating_point():
            raise TypeError(f'SegMANEncoder expects a floating-point image, got {x.dtype}')
        if self.check_finite and not torch.isfinite(x).all():
            raise ValueError('SegMANEncoder input contains NaN or Inf')
        if self.cuda_graphs is not None:
            return self.cuda_graphs(self, self._features, x)
        return self._features(x)

    def _features(self, x: Tensor) -> Tuple[Tensor, ...]:
        x = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.stages):
            if i:
                x = self.downsamples[i - 1](x)
            x = stage(x)
            if self.check_finite and not torch.isfinite(x).all():
                raise ValueError(
                    f'SegMANEncoder stage {i + 1} output has NaN/Inf from a finite input: float32 '
                    'overflows for inputs of very large magnitude; feed normalised images (as '
                    "mmseg's SegDataPreProcessor does with the config's mean and std)")
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)
