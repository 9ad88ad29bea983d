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
    q, k = torch.randn(2, 2, 1, height, width, head_dim)
    for x, out in zip((q, k), rotary_embedding_2d(q, k, sin, cos)):
        for i in range(height):
            for j in range(width):
                phase = torch.cat([i * rope.angle, j * rope.angle])
                v = x[:, :, i, j]
                rotated = torch.empty_like(v)
                rotated[..., 0::2], rotated[..., 1::2] = -v[..., 1::2], v[..., 0::2]
                torch.testing.assert_close(out[:, :, i, j],
                                           v * phase.cos() + rotated * phase.sin())


def test_rope_keeps_angle_in_state_dict_and_checks_head_dim():
    assert list(RoPE2d(16).state_dict()) == ['angle']
    with pytest.raises(ValueError, match='divisible by 4'):
        RoPE2d(18)


def test_rotary_embedding_gradcheck():
    sin, cos = RoPE2d(8).double()((2, 3))
    q, k = torch.randn(2, 1, 2, 2, 3, 8, dtype=torch.float64).unbind()
    assert torch.autograd.gradcheck(lambda *qk: rotary_embedding_2d(*qk, sin, cos, 0.5),
                                    (q.requires_grad_(), k.requires_grad_()))


def test_tables_are_kept_per_size_until_the_angles_change():
    rope = RoPE2d(8)
    first = rope((3, 5))
    assert rope((3, 5))[0] is first[0] and rope((4, 5))[0] is not first[0]
    with torch.inference_mode():
        made_there = rope((2, 2))
    assert not made_there[0].is_inference()  # autograd may save them in a later training step
    for size in ((5, 5), (6, 5), (7, 5)):
        rope(size)
    assert len(rope._cache) == RoPE2d.CACHED_SIZES and rope((3, 5))[0] is not first[0]
    rope.load_state_dict({'angle': rope.angle * 2})  # in place: the angles' version changes
    doubled = rope((3, 5))
    torch.testing.assert_close(doubled[0], rope._tables((3, 5))[0])
    assert not torch.equal(doubled[0], first[0])
    rope.double()  # a new tensor
    assert rope((3, 5))[0].dtype == torch.float64


def test_fake_tensor_tables_are_not_kept():
    """Under FakeTensorMode (tools/saved_for_backward.py counts activations so) the tables are
    computed, not kept: a fake tensor has no data pointer to key them by."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        rope = RoPE2d(8)
        rope.angle = mode.from_tensor(rope.angle)
        sin, _ = rope((3, 5))
    assert sin.shape == (3, 5, 8) and not rope._cache
