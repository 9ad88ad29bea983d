"""Building blocks shared by the SegMAN encoder and decoder."""
from .block import LayerScale, SegMANBlock
from .conv import (BatchNormActConvModule, ConvNormSequence, DenseConv2d, DepthwiseConv2d,
                   PointwiseConv2d)
from .ffn import ConvFFN
from .norm import LayerNorm2d
from .rope import RoPE2d
from .ss2d import SS2D

__all__ = ['BatchNormActConvModule', 'ConvFFN', 'ConvNormSequence', 'DenseConv2d', 'DepthwiseConv2d',
           'LayerNorm2d', 'LayerScale', 'PointwiseConv2d', 'RoPE2d', 'SS2D', 'SegMANBlock']
