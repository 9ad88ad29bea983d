"""``cross_entropy_2d``: its checks, the reference against ``F.cross_entropy`` and ``argmax``,
and the Triton backend against float64 in Triton's CPU interpreter (a subprocess running this
file, see triton_interpreter.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmseg_segman.ops import cross_entropy_2d
from mmseg_segman.ops.cross_entropy import _cross_entropy_2d


def test_triton_cross_entropy_in_interpreter():
    pytest.importorskip('triton')
    from .triton_interpreter import assert_checks_pass_in_interpreter
    assert_checks_pass_in_interpreter(__file__, timeout=300)


def test_reference_is_pytorchs_cross_entropy_and_argmax():
    logits, label = make_inputs(2, 7, 5, 6, torch.float32)
    leaf = logits.clone().requires_grad_()
    loss, prediction = cross_entropy_2d(leaf, label, ignore_index=255)
    twin = logits.clone().requires_grad_()
    want = F.cross_entropy(twin, label, reduction='none', ignore_index=255)
    torch.testing.assert_close(loss, want)
    assert torch.equal(prediction, logits.argmax(1))
    dloss = torch.rand(loss.shape)
    loss.backward(dloss), want.backward(dloss)
    torch.testing.assert_close(leaf.grad, twin.grad)


def test_a_label_outside_the_classes_gives_nan_not_a_crash():
    logits, label = make_inputs(1, 4, 3, 3, torch.float32)
    label[0, 0, 0], label[0, 1, 1], label[0, 0, 2] = 4, -1, 255
    label[0, 2] = torch.tensor([0, 1, 2])
    loss, _ = cross_entropy_2d(logits, label, ignore_index=255)
    assert math.isnan(loss[0, 0, 0]) and math.isnan(loss[0, 1, 1])
    assert torch.isfinite(loss[0, 2]).all() and loss[0, 2, 2] > 0 and loss[0, 0, 2] == 0


def test_not_chosen_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    args = (*make_inputs(1, 4, 3, 3, torch.float32), 255)
    assert 'TRITON_INTERPRET' in _cross_entropy_2d.why_not('triton', *args)
    assert _cross_entropy_2d.select(*args) == 'torch'


def test_bad_inputs_are_refused():
    logits, label = make_inputs(2, 4, 3, 5, torch.float32)
    with pytest.raises(ValueError, match=r'\(B, K, H, W\) and label \(B, H, W\)'):
        cross_entropy_2d(logits[0], label)
    with pytest.raises(ValueError, match=r'got \(2, 4, 3, 5\) and \(2, 3, 4\)'):
        cross_entropy_2d(logits, label[:, :, :4])
    with pytest.raises(ValueError, match='label int64, got torch.float32 and torch.int32'):
        cross_entropy_2d(logits, label.int())
    with pytest.raises(ValueError, match='must be float'):
        cross_entropy_2d(label[:, None], label)
    with pytest.raises(ValueError, match='no classes'):
        cross_entropy_2d(logits[:, :0], label)


def make_inputs(batch, classes, height, width, dtype, seed=0, ignore_index=255):
    """Logits (a spread of 3; some pixels' top classes tied: the first two and the last, in
    another step of the kernel's classes where there are more than 16) and labels, a fifth of
    them ``ignore_index``."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, height, width, generator=g) * 3
    if classes > 1:
        top = logits.max(1).values[:, ::3] + 1
        logits[:, 0, ::3] = logits[:, 1, ::3] = logits[:, -1, ::3] = top
    label = torch.randint(0, classes, (batch, height, width), generator=g)
    label[torch.rand(label.shape, generator=g) < 0.2] = ignore_index
    return logits.to(dtype), label


def run(fn, logits, label, dloss, ignore_index):
    """Loss, prediction and the logits' gradient."""
    leaf = logits.detach().clone().requires_grad_()
    loss, prediction = fn(leaf, label, ignore_index)
    loss.backward(dloss)
    return loss, prediction, leaf.grad


def check(batch, classes, height, width, dtype, tol, ignore_index=255):
    """Against the float64 reference; the bar is tol or twice the float32 reference's error
    (the logits as ``dtype`` holds them); the prediction exactly, ties to the first class."""
    from mmseg_segman.ops.triton_cross_entropy import cross_entropy_2d_triton

    logits, label = make_inputs(batch, classes, height, width, dtype, seed=classes * width,
                                ignore_index=ignore_index)
    dloss = torch.rand(label.shape, generator=torch.Generator().manual_seed(1))
    reference = _cross_entropy_2d.backends['torch'].fn
    got = run(cross_entropy_2d_triton, logits, label, dloss, ignore_index)
    want = run(reference, logits.double(), label, dloss.double(), ignore_index)
    ref32 = run(reference, logits.float(), label, dloss, ignore_index)
    assert got[0].dtype == torch.float32 and got[2].dtype == dtype
    assert torch.equal(got[1], logits.float().argmax(1)), 'prediction'
    for name, a, b, c in (('loss', got[0], want[0], ref32[0]), ('dlogits', got[2], want[2], ref32[2])):
        err, err32 = (((v.double() - b).abs().max() / (b.abs().max() + 1e-12)).item() for v in (a, c))
        assert err <= max(tol, 2 * err32), (batch, classes, height, width, dtype, name, err, err32)
    ignored = label == ignore_index
    assert (got[0][ignored] == 0).all() and (got[2].permute(0, 2, 3, 1)[ignored] == 0).all()
    print(f'{str(dtype)[6:]} B{batch} K{classes} {height}x{width}: ok')


def check_foreign_labels():
    """A label outside the classes: NaN loss, the other pixels as the reference's."""
    from mmseg_segman.ops.triton_cross_entropy import cross_entropy_2d_triton

    logits, label = make_inputs(2, 5, 4, 4, torch.float32)
    label[0, 0, 0], label[1, 2, 3] = 5, -3
    got, _ = cross_entropy_2d_triton(logits, label, 255)
    want, _ = _cross_entropy_2d.backends['torch'].fn(logits, label, 255)
    assert torch.isnan(got[0, 0, 0]) and torch.isnan(got[1, 2, 3])
    torch.testing.assert_close(got, want, equal_nan=True)
    print('foreign labels: ok')


def check_dispatch():
    """The dispatcher picks triton for contiguous float logits and labels, the reference for
    float64 logits and for a strided view."""
    logits, label = make_inputs(2, 5, 4, 6, torch.float32)
    assert _cross_entropy_2d.select(logits, label, 255) == 'triton'
    assert _cross_entropy_2d.select(logits.double(), label, 255) == 'torch'
    strided = logits.transpose(2, 3)
    assert 'not contiguous' in _cross_entropy_2d.why_not('triton', strided, label.transpose(1, 2), 255)
    print('dispatch: ok')


def check_custom_op():
    """The kernels as custom ops (opcheck: schema, fake shapes, autograd); eager calls skip
    them and match them bitwise."""
    from triton_interpreter import check_eager_calls_skip_custom_ops

    from mmseg_segman.ops.triton_cross_entropy import CROSS_ENTROPY_2D, cross_entropy_2d_triton

    logits, label = make_inputs(2, 6, 5, 3, torch.float32)
    torch.library.opcheck(CROSS_ENTROPY_2D.forward_op, (logits.requires_grad_(), label, 255))
    loss, lse, _ = CROSS_ENTROPY_2D.forward_op(logits.detach(), label, 255)
    torch.library.opcheck(CROSS_ENTROPY_2D.backward_op,
                          (torch.rand_like(loss), logits.detach(), label, lse, 255))

    def custom_op(x):
        return CROSS_ENTROPY_2D.forward_op(x, label, 255)[0]

    def op(x):
        return cross_entropy_2d_triton(x, label, 255)[0]

    check_eager_calls_skip_custom_ops(
        op, custom_op, [logits.detach()], torch.rand(loss.shape, generator=torch.Generator().manual_seed(6)),
        ('cross_entropy_2d_forward', 'cross_entropy_2d_backward'))
    print('custom op: ok')


def main():
    # classes: fewer than a step (8), several steps, the last cut short; pixels: fewer than a
    # program's (1024), two programs' (the last cut short), counts that are not a multiple of
    # 8 (no 16-byte loads)
    for shape in [(2, 5, 4, 6), (1, 37, 17, 19), (2, 19, 32, 40), (1, 11, 40, 33), (1, 1, 3, 3)]:
        check(*shape, torch.float32, 1e-5)
    check(2, 150, 8, 8, torch.float32, 1e-5, ignore_index=0)  # an ignored class
    check(2, 19, 9, 8, torch.bfloat16, 1e-2)
    check(2, 19, 9, 8, torch.float16, 2e-3)
    check_foreign_labels()
    check_dispatch()
    check_custom_op()
    print('all checks passed')


if __name__ == '__main__':
    main()
