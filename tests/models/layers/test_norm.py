"""``op_activation``: the activation modules the ops compute themselves."""
from torch import nn

from mmseg_segman.models.layers.norm import op_activation


class ScaledGELU(nn.GELU):
    def forward(self, x):
        return 2 * super().forward(x)


def test_op_activation_names_exactly_the_modules_the_ops_compute():
    assert op_activation(nn.GELU()) == 'gelu'
    assert op_activation(nn.SiLU()) == 'silu'
    assert op_activation(nn.ReLU(inplace=True)) == 'relu'
    for other in (nn.GELU(approximate='tanh'), ScaledGELU(), nn.LeakyReLU(), nn.Identity(), None):
        assert op_activation(other) is None, other
