"""mmengine's loaders refuse weights that do not fit SegMAN, naming the tensors."""
import pytest
import torch
from mmengine.runner import load_checkpoint
from mmseg.apis import init_model

from mmseg_segman.models import SegMANEncoder
from mmseg_segman.models.strict_loading import WeightsMismatchError

from ..conftest import REPO, captured_log, official_keys

TOY_CONFIG = REPO / 'configs' / 'segman' / 'segman-t_1xb8-300i_toy-96x96.py'


@pytest.fixture(scope='module')
def model():
    return init_model(str(TOY_CONFIG), None, device='cpu')


def refusal(model, tmp_path, checkpoint) -> str:
    torch.save(checkpoint, tmp_path / 'ckpt.pth')
    with pytest.raises(WeightsMismatchError) as error:
        load_checkpoint(model, str(tmp_path / 'ckpt.pth'), map_location='cpu')  # strict=False
    return str(error.value)


def test_another_size_is_refused(model, tmp_path):
    s_weights = {k: torch.zeros(shape) for k, shape in official_keys('s').items()}
    message = refusal(model, tmp_path, {'state_dict': s_weights})
    assert 'does not fit SegMANEncoder' in message and 'another SegMAN size' in message
    assert 'backbone.patch_embed.0.weight: checkpoint (32, 3, 3, 3) vs model (16, 3, 3, 3)' in message


def test_no_segman_weights_is_refused(model, tmp_path):
    message = refusal(model, tmp_path, {'foo': torch.zeros(3)})
    assert "no SegMANEncoder weights" in message and "'backbone.patch_embed.0.weight'" in message


def test_non_finite_and_other_class_count_are_named(model, tmp_path):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state['decode_head.cat.conv.weight'][0, 0] = float('nan')
    message = refusal(model, tmp_path, {'state_dict': state})
    assert "1 tensors with NaN or Inf ['decode_head.cat.conv.weight']" in message
    state = {k: v for k, v in model.state_dict().items()}
    state['decode_head.conv_seg.weight'] = torch.zeros(150, 128, 1, 1)
    message = refusal(model, tmp_path, {'state_dict': state})
    assert 'does not fit SegMANHead' in message and 'decode_head.conv_seg.weight: checkpoint (150' in message
    assert 'set reinit_mismatched_classifier=True' in message


def test_matching_weights_load(model, tmp_path):
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'same.pth')
    load_checkpoint(model, str(tmp_path / 'same.pth'), map_location='cpu')
    encoder = SegMANEncoder(arch='t')
    part = {k: v for k, v in encoder.state_dict().items() if k.startswith('patch_embed.')}
    with pytest.raises(WeightsMismatchError, match='missing tensors'):
        encoder.load_state_dict(part, strict=False)  # torch's own loader is guarded too


def fine_tuning_model(initialised: bool):
    """The toy model with the fine-tuning opt-in, its weights initialised as in training or not."""
    model = init_model(str(TOY_CONFIG), None, device='cpu',
                       cfg_options={'model.decode_head.reinit_mismatched_classifier': True})
    if initialised:
        model.init_weights()
    return model


def ade20k_checkpoint(model, path, **changed) -> dict:
    """``model``'s weights, shifted, with a 150-class classifier and ``changed`` tensors
    (``None``: left out)."""
    state = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    state.update({'decode_head.conv_seg.weight': torch.randn(150, 128, 1, 1),
                  'decode_head.conv_seg.bias': torch.randn(150)}, **changed)
    state = {k: v for k, v in state.items() if v is not None}
    torch.save({'state_dict': state}, path)
    return state


def test_fine_tuning_keeps_the_initialised_classifier(tmp_path):
    model = fine_tuning_model(initialised=True)
    initialised = {k: v.clone() for k, v in model.decode_head.conv_seg.state_dict().items()}
    state = ade20k_checkpoint(model, tmp_path / 'ade20k.pth')
    with captured_log() as records:
        load_checkpoint(model, str(tmp_path / 'ade20k.pth'), map_location='cpu', logger='current')
    for key, value in model.state_dict().items():
        expected = initialised[key[len('decode_head.conv_seg.'):]] if 'conv_seg' in key else state[key]
        assert torch.equal(value, expected), key
    warnings = [r.getMessage() for r in records if r.levelname == 'WARNING']
    assert len(warnings) == 1, warnings  # and none of mmengine's about sizes
    assert ('decode_head.conv_seg.weight: checkpoint (150, 128, 1, 1) vs model (5, 128, 1, 1), '
            'decode_head.conv_seg.bias: checkpoint (150,) vs model (5,)') in warnings[0]


def test_fine_tuning_opt_in_does_not_apply_to_testing(tmp_path):
    """tools/test.py, init_model and the inferencer never initialise weights."""
    model = fine_tuning_model(initialised=False)
    ade20k_checkpoint(model, tmp_path / 'ade20k.pth')
    with pytest.raises(WeightsMismatchError, match=r'decode_head.conv_seg.weight: checkpoint \(150.*'
                                                   'applies only when training starts'):
        load_checkpoint(model, str(tmp_path / 'ade20k.pth'), map_location='cpu')


@pytest.mark.parametrize('changed, named', [
    ({'decode_head.cat.conv.weight': torch.zeros(128, 1, 1, 1)},
     "1 shape mismatches ['decode_head.cat.conv.weight: checkpoint (128, 1, 1, 1)"),
    ({'decode_head.conv_seg.bias': None}, "1 missing tensors ['decode_head.conv_seg.bias']"),
    ({'backbone.patch_embed.0.weight': torch.zeros(32, 3, 3, 3)},
     "does not fit SegMANEncoder at 'backbone.': 1 shape mismatches"),
], ids=['head-tensor', 'missing-classifier-bias', 'encoder-tensor'])
def test_fine_tuning_refuses_any_other_mismatch(tmp_path, changed, named):
    model = fine_tuning_model(initialised=True)
    ade20k_checkpoint(model, tmp_path / 'ade20k.pth', **changed)
    with captured_log() as records, pytest.raises(WeightsMismatchError) as error:
        load_checkpoint(model, str(tmp_path / 'ade20k.pth'), map_location='cpu', logger='current')
    assert named in str(error.value)
    assert not [r for r in records if r.levelname == 'WARNING']  # nothing said to be kept
