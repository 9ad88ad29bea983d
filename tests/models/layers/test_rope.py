import pytest
import torch

from mmseg_segman.models.layers import RoPE2d
from mmseg_segman.ops import rotary_embedding_2d


def test_rope_follows_spec():
    head_dim, height, width = 8, 3, 5
    rope = RoPE2d(head_dim)
    base = 1 / 10000 ** torch.linspace(0, 1, head_dim // 4)
    assert torch.equal(rope.angle, torch.stack([base, base], 1).flatten())
    sin, cos = rope((height, width))
    assert sin.shape == cos.shape == (height, width, head_dim)
    x = torch.randn(2, 1, height, width, head_dim)
    out = rotary_embedding_2d(x, sin, cos)
    for i in range(height):
        for j in range(width):
            phase = torch.cat([i * rope.angle, j * rope.angle])
            v = x[:, :, i, j]
            rotated = torch.empty_like(v)
            rotated[..., 0::2], rotated[..., 1::2] = -v[..., 1::2], v[..., 0::2]
            torch.testing.assert_close(out[:, :, i, j], v * phase.cos() + rotated * phase.sin())


def test_rope_keeps_angle_in_state_dict_and_checks_head_dim():
    assert list(RoPE2d(16).state_dict()) == ['angle']
    with pytest.raises(ValueError, match='divisible by 4'):
        RoPE2d(18)


def test_rotary_embedding_gradcheck():
    sin, cos = RoPE2d(8).double()((2, 3))
    x = torch.randn(1, 2, 2, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: rotary_embedding_2d(t, sin, cos, 0.5), (x,))
