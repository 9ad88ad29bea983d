"""SegMANBlock: the residual connections its mixer and FFN apply are the released block's
``x + drop_path(layer_scale(branch))``, stochastic depth included."""
import pytest
import torch
import torch.nn.functional as F
from mmcv.cnn.bricks import DropPath

from mmseg_segman.models.layers import SS2D, LayerScale, SegMANBlock


def released_forward(block: SegMANBlock, x: torch.Tensor) -> torch.Tensor:
    """The release's block: each layer on its own, mmcv's DropPath, the layer scale as a
    grouped 1x1 convolution."""

    def layer_scale(module, y):
        if isinstance(module, LayerScale):
            return F.conv2d(y, module.weight, module.bias, groups=y.shape[1])
        return y

    drop = block.drop_path
    x = block.cpe1(x)
    x = x + drop(layer_scale(block.layer_scale1, block.token_mixer(block.norm1(x))))
    x = block.cpe2(x)
    mlp = block.mlp
    hidden = mlp.fc2(mlp.dwconv(mlp.act(mlp.fc1(block.norm2(x)))))
    return x + drop(layer_scale(block.layer_scale2, hidden))


@pytest.mark.parametrize('layer_scale', [None, 0.5])
@pytest.mark.parametrize('drop_path', [0.0, 0.5])
@pytest.mark.parametrize('training', [False, True])
def test_block_equals_the_released_layers(layer_scale, drop_path, training):
    torch.manual_seed(0)
    block = SegMANBlock(8, SS2D(8), ffn_dim=16, drop_path=drop_path, layer_scale_init=layer_scale)
    for module in (block.layer_scale1, block.layer_scale2):
        if isinstance(module, LayerScale):  # away from the initial values
            torch.nn.init.normal_(module.weight)
            torch.nn.init.normal_(module.bias)
    block.train(training)
    x = torch.randn(4, 8, 5, 6)
    torch.manual_seed(1)
    got = block(x)
    torch.manual_seed(1)
    want = released_forward(block, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if training and drop_path:
        assert isinstance(block.drop_path, DropPath)
        # the seed drops some samples and keeps others in each draw: both kinds were checked
        torch.manual_seed(1)
        for _ in range(2):
            kept = (0.5 + torch.rand(4)).floor()
            assert 0 < kept.sum() < 4


def test_a_drop_path_in_eval_mode_drops_nothing():
    """As with mmcv's DropPath, the module's own mode decides: in a training block whose
    ``drop_path`` is in eval mode no sample is dropped (tools/gpu_checks/check_compile.py
    turns stochastic depth off so)."""
    torch.manual_seed(0)
    block = SegMANBlock(8, SS2D(8), ffn_dim=16, drop_path=0.9).train()
    block.drop_path.eval()
    x = torch.randn(4, 8, 5, 6)
    torch.manual_seed(1)
    got = block(x)
    torch.manual_seed(1)
    torch.testing.assert_close(got, released_forward(block, x), rtol=1e-5, atol=1e-5)
