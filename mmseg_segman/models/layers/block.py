"""The residual block shared by the encoder stages and the decoder's scan block."""
from typing import Dict, Optional, Tuple

import torch
from mmcv.cnn.bricks import DropPath
from torch import Tensor, nn

from ...ops.pointwise_conv import Residual
from .conv import DepthwiseConv2d
from .ffn import ConvFFN
from .norm import LayerNorm2d
from .recompute import recomputed_for_backward


class LayerScale(nn.Module):
    """The parameters of a per-channel scale and shift, released as a depthwise 1x1 conv (keys
    ``weight (C,1,1,1)``, ``bias``); :class:`SegMANBlock` applies them through its
    :class:`~mmseg_segman.ops.pointwise_conv.Residual`."""

    def __init__(self, embed_dim: int, init_value: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.full((embed_dim, 1, 1, 1), init_value))
        self.bias = nn.Parameter(torch.zeros(embed_dim))


class SegMANBlock(nn.Module):
    """``x + cpe1(x)``, token mixer, ``x + cpe2(x)``, FFN; each branch pre-normed.

    ``x = x + cpe1(x); x = x + drop_path(ls1(token_mixer(norm1(x), *mixer_args)))``
    ``x = x + cpe2(x); x = x + drop_path(ls2(mlp(norm2(x))))``

    While a CUDA graph captures the training step, the norms' backward passes recompute their
    inputs from the ``cpe`` convolutions' inputs (:func:`~.recompute.recomputed_for_backward`).
    The token mixer and the FFN take each residual connection (``x + drop_path(ls(.))``) as a
    :class:`~mmseg_segman.ops.pointwise_conv.Residual` and apply it themselves, inside the op of
    their last 1x1 convolution where they end with one (one pass on the fast path).

    Args:
        embed_dim: channels of the ``(B, C, H, W)`` input.
        token_mixer: the mixing module (LASS in the encoder, SS2D in the decoder).
        ffn_dim: hidden channels of the FFN.
        drop_path: stochastic depth rate.
        layer_scale_init: initial layer scale, or None for no layer scale.
        act_cfg: the FFN's activation.
    """

    def __init__(self, embed_dim: int, token_mixer: nn.Module, ffn_dim: int,
                 drop_path: float = 0.0, layer_scale_init: Optional[float] = None,
                 act_cfg: Dict = dict(type='GELU')):
        super().__init__()
        self.cpe1 = DepthwiseConv2d(embed_dim, 3, residual=True)
        self.norm1 = LayerNorm2d(embed_dim)
        self.token_mixer = token_mixer
        self.cpe2 = DepthwiseConv2d(embed_dim, 3, residual=True)
        self.norm2 = LayerNorm2d(embed_dim)
        self.mlp = ConvFFN(embed_dim, ffn_dim, act_cfg)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if layer_scale_init is None:
            self.layer_scale1 = self.layer_scale2 = nn.Identity()
        else:
            self.layer_scale1 = LayerScale(embed_dim, layer_scale_init)
            self.layer_scale2 = LayerScale(embed_dim, layer_scale_init)

    def forward(self, x: Tensor, *mixer_args) -> Tensor:
        x, normed = self._cpe_and_norm(x, self.cpe1, self.norm1)
        x = self.token_mixer(normed, *mixer_args, residual=self._residual(x, self.layer_scale1))
        x, normed = self._cpe_and_norm(x, self.cpe2, self.norm2)
        return self.mlp(normed, residual=self._residual(x, self.layer_scale2))

    @staticmethod
    def _cpe_and_norm(x: Tensor, cpe: DepthwiseConv2d, norm: LayerNorm2d) -> Tuple[Tensor, Tensor]:
        """``(cpe(x), norm(cpe(x)))``; the norm's backward pass may recompute ``cpe(x)``."""
        x_cpe = cpe(x)
        with recomputed_for_backward(x_cpe, x, cpe.forward):
            return x_cpe, norm(x_cpe)

    def _residual(self, shortcut: Tensor, layer_scale: nn.Module) -> Residual:
        """``shortcut + drop_path(layer_scale(.))`` as a :class:`Residual`: stochastic depth
        draws its per-sample factor as mmcv's ``drop_path`` does (``floor(keep + U[0, 1))``
        over ``keep``, one draw per batch element), where the ``DropPath`` module is in
        training mode."""
        scale = shift = sample_scale = None
        if isinstance(layer_scale, LayerScale):
            scale, shift = layer_scale.weight.view(-1), layer_scale.bias
        drop_path = self.drop_path
        if isinstance(drop_path, DropPath) and drop_path.training and drop_path.drop_prob > 0:
            keep = 1 - drop_path.drop_prob
            draw = torch.rand(shortcut.shape[0], dtype=shortcut.dtype, device=shortcut.device)
            sample_scale = (keep + draw).floor_().div_(keep)
        return Residual(shortcut, scale, shift, sample_scale)
