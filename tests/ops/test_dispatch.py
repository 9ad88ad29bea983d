"""Backend choice: scopes, the precedence of code, config and environment, named refusals."""
import pytest
import torch

from mmseg_segman.models import SegMANEncoder
from mmseg_segman.ops import neighborhood_attention_2d, use_backends
from mmseg_segman.ops import dispatch
from mmseg_segman.ops.dispatch import (Backend, cast_kept, check_op_backends, registered_ops,
                                        runs_anywhere, tensor_cache)

NA = registered_ops()['neighborhood_attention']
TINY = dict(embed_dims=[8, 8, 8, 8], depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
            window_size=[3, 3, 3, 3], mlp_ratios=[1, 1, 1, 1])


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for key in list(__import__('os').environ):
        if key.startswith('SEGMAN_BACKEND'):
            monkeypatch.delenv(key)


@pytest.fixture
def spy(monkeypatch):
    """A backend ``spy`` of neighborhood attention, last in order (never chosen automatically),
    that counts its calls and runs the reference."""
    calls = []

    def run(*args):
        calls.append(args[0].shape)
        return NA.backends['torch'].fn(*args)

    monkeypatch.setitem(NA.backends, 'spy', Backend(run, runs_anywhere))
    return calls


def na_inputs():
    q = torch.randn(1, 2, 6, 5, 4)
    return q, q, q, 3, None


def test_scope_applies_inside_only(spy):
    neighborhood_attention_2d(*na_inputs())
    assert not spy
    with use_backends(neighborhood_attention='spy'):
        neighborhood_attention_2d(*na_inputs())
        with use_backends('torch'):  # the innermost scope wins
            neighborhood_attention_2d(*na_inputs())
    assert len(spy) == 1
    neighborhood_attention_2d(*na_inputs())
    assert len(spy) == 1


def test_precedence_code_config_environment(spy, monkeypatch):
    inputs = na_inputs()
    monkeypatch.setenv('SEGMAN_BACKEND_NEIGHBORHOOD_ATTENTION', 'spy')
    assert NA.select(*inputs) == 'spy'
    model = SegMANEncoder(TINY, op_backends=dict(neighborhood_attention='torch')).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))  # config beats environment
    assert not spy
    with use_backends(neighborhood_attention='spy'), torch.no_grad():
        SegMANEncoder(TINY, op_backends=dict(neighborhood_attention='torch')).eval()(
            torch.randn(1, 3, 64, 64))  # code beats config
    assert len(spy) == 4  # one call per stage
    with use_backends(neighborhood_attention=None):  # automatic, whatever weaker places say
        assert NA.select(*inputs) == 'torch'
    monkeypatch.setenv('SEGMAN_BACKEND_NEIGHBORHOOD_ATTENTION', 'torch')
    monkeypatch.setenv('SEGMAN_BACKEND', 'spy')  # the op's own variable beats the general one
    assert NA.select(*inputs) == 'torch'


def test_model_setting_does_not_outlive_its_forward_and_covers_recompute(spy):
    """A model's op_backends hold in its forward, and in the recompute of checkpointed
    blocks (which runs in the backward pass, after the forward returned), never for another
    model built after it."""
    chosen = SegMANEncoder(TINY, with_cp=True, op_backends=dict(neighborhood_attention='spy'))
    other = SegMANEncoder(TINY, with_cp=True)
    x = torch.randn(1, 3, 64, 64)
    sum(o.sum() for o in other(x)).backward()
    assert not spy
    outs = chosen(x)
    assert len(spy) == 4
    sum(o.sum() for o in outs).backward()
    assert len(spy) == 8  # every block recomputed on the spy backend
    neighborhood_attention_2d(*na_inputs())
    assert len(spy) == 8


def test_unknown_names_are_refused_where_given(monkeypatch):
    with pytest.raises(ValueError, match="no backend 'toch'"):
        use_backends(neighborhood_attention='toch')
    with pytest.raises(ValueError, match="unknown SegMAN op 'neighbourhood_attention'"):
        use_backends(neighbourhood_attention='torch')
    with pytest.raises(ValueError, match="no SegMAN op has a backend 'toch'"):
        use_backends('toch')
    with pytest.raises(ValueError, match=r"SegMANHead\(op_backends=.*no backend 'toch'"):
        check_op_backends(dict(cross_selective_scan='toch'), 'SegMANHead')
    with pytest.raises(ValueError, match="no backend 'toch'"):
        SegMANEncoder(TINY, op_backends=dict(neighborhood_attention='toch'))
    for key, value, message in [('SEGMAN_BACKEND', 'toch', "SEGMAN_BACKEND=toch: no SegMAN op"),
                                ('SEGMAN_BACKEND_NEIGHBORHOOD_ATTENTION', 'toch', "no backend 'toch'"),
                                ('SEGMAN_BACKEND_NEIGHBOURHOOD_ATTENTION', 'torch', 'names no SegMAN op')]:
        with monkeypatch.context() as env:
            env.setenv(key, value)
            with pytest.raises(ValueError, match=message):
                neighborhood_attention_2d(*na_inputs())


def test_general_environment_variable_applies_to_ops_that_have_the_backend(monkeypatch):
    monkeypatch.setenv('SEGMAN_BACKEND', 'flex')  # only neighborhood attention has flex
    q = torch.randn(1, 2, 4, 4)
    assert registered_ops()['biased_attention'].select(q, q, q, None) == 'sdpa'
    with pytest.raises(RuntimeError, match="'flex' of op 'neighborhood_attention' \\(chosen by "
                                           "SEGMAN_BACKEND\\) cannot run these inputs: needs CUDA"):
        neighborhood_attention_2d(*na_inputs())


def test_refusal_says_who_chose_and_why():
    q = torch.randn(1, 2, 9, 9, 4)
    with use_backends(neighborhood_attention='natten'):
        with pytest.raises(RuntimeError, match=r'chosen by use_backends.*relative position bias'):
            neighborhood_attention_2d(q, q, q, 3, torch.zeros(2, 5, 5))
    assert NA.why_not('natten', q[:, :, :5], q[:, :, :5], q[:, :, :5], 7, None) == \
        'the 5x9 map is smaller than the 7x7 window'
    assert NA.why_not('flex', q, q, q, 3, None) == 'needs CUDA tensors'
    scan = registered_ops()['cross_selective_scan']
    x = torch.randn(1, 2, 3, 3)
    inputs = (x, torch.randn(1, 4, 1, 9), torch.randn(4, 2, 1), -torch.rand(8, 1),
              torch.randn(1, 4, 1, 9), torch.randn(1, 4, 1, 9), torch.randn(8), torch.randn(8))
    assert 'needs every input on CUDA' in scan.why_not('triton', *inputs)


def test_an_availability_check_must_return_a_reason(monkeypatch):
    monkeypatch.setitem(NA.backends, 'boolean', Backend(NA.backends['torch'].fn, lambda *a: True))
    with use_backends(neighborhood_attention='boolean'):
        with pytest.raises(TypeError, match='must return None or a reason string'):
            neighborhood_attention_2d(*na_inputs())


def test_automatic_choice_refuses_an_availability_check_without_a_reason(monkeypatch):
    monkeypatch.setattr(NA, 'backends', {
        'boolean': Backend(NA.backends['torch'].fn, lambda *a: False), **NA.backends})
    with pytest.raises(TypeError, match="backend 'boolean' .* must return None or a reason"):
        neighborhood_attention_2d(*na_inputs())


def test_scope_survives_torch_compile(spy):
    compiled = torch.compile(lambda *args: neighborhood_attention_2d(*args), backend='eager')
    with use_backends(neighborhood_attention='spy'):
        compiled(*na_inputs())
    assert len(spy) == 1
    compiled(*na_inputs())  # a graph traced inside the scope is not reused outside it
    assert len(spy) == 1


def test_model_setting_holds_in_one_compiled_graph(spy):
    """A model's op_backends choose inside a compiled forward, with no graph break, and
    nothing is left behind after it."""
    from mmseg_segman.ops import dispatch
    model = SegMANEncoder(TINY, op_backends=dict(neighborhood_attention='spy')).eval()
    compiled = torch.compile(model, fullgraph=True, backend='eager')
    with torch.no_grad():
        compiled(torch.randn(1, 3, 64, 64))
    assert len(spy) == 4
    assert not dispatch._config and not dispatch._code
    neighborhood_attention_2d(*na_inputs())
    assert len(spy) == 4


def test_tensor_cache_keeps_no_fake_tensor():
    """A tensor made under a FakeTensorMode (tools/analysis_tools/saved_for_backward.py) is not
    cached: a later real call with the same arguments got the fake one, which holds no memory
    (on the GPU an illegal memory access in the next kernel given it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

    calls = []

    @tensor_cache(maxsize=4)
    def ramp(n: int, device: torch.device) -> torch.Tensor:
        calls.append(n)
        return torch.arange(n, dtype=torch.float32, device=device)

    with FakeTensorMode():
        assert is_fake(ramp(3, torch.device('cpu')))
    real = ramp(3, torch.device('cpu'))
    assert not is_fake(real) and torch.equal(real, torch.arange(3.0))
    assert ramp(3, torch.device('cpu')) is real and calls == [3, 3]  # cached once real


def test_cast_kept_is_kept_until_the_tensor_changes():
    weight = torch.nn.Parameter(torch.randn(4, 3))
    half = cast_kept(weight, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and not half.requires_grad
    assert torch.equal(half, weight.detach().to(torch.bfloat16))
    assert cast_kept(weight, torch.bfloat16) is half  # kept
    assert cast_kept(weight, torch.float32) is weight  # its own dtype: no copy
    with torch.no_grad():
        weight.mul_(2)  # written in place (load_state_dict, an optimizer step)
    fresh = cast_kept(weight, torch.bfloat16)
    assert fresh is not half and torch.equal(fresh, weight.detach().to(torch.bfloat16))
    weight.data = weight.data.clone() + 1  # moved (module.to)
    moved = cast_kept(weight, torch.bfloat16)
    assert moved is not fresh and torch.equal(moved, weight.detach().to(torch.bfloat16))
    assert cast_kept(weight, torch.float16).dtype == torch.float16  # one dtype kept a tensor
    assert cast_kept(weight, torch.bfloat16) is not moved


def test_cast_kept_casts_a_view_through_its_base():
    weight = torch.nn.Parameter(torch.randn(4, 6))
    views = [weight[:, :, None, None], weight[1:3, ::2], weight.t()]
    for view in views:
        got = cast_kept(view, torch.bfloat16)
        assert torch.equal(got, view.detach().to(torch.bfloat16)) and got.stride() == view.stride()
    kept = cast_kept(weight, torch.bfloat16)
    assert all(cast_kept(v, torch.bfloat16)._base is kept for v in views)  # one copy, kept
    scattered = torch.empty_strided((4, 6), (1, 4)).normal_()  # not contiguous, not a view
    view = scattered[:, :, None]
    assert torch.equal(cast_kept(view, torch.bfloat16), view.to(torch.bfloat16))
    assert scattered not in dispatch._kept


def test_cast_kept_keeps_nothing_under_fake_tensors_or_inference_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

    with FakeTensorMode():
        weight = torch.randn(4, 3)
        assert is_fake(cast_kept(weight, torch.bfloat16))
    assert weight not in dispatch._kept
    with torch.inference_mode():
        weight = torch.randn(4, 3)
        assert cast_kept(weight, torch.bfloat16) is not cast_kept(weight, torch.bfloat16)
