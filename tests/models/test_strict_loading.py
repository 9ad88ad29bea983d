"""mmengine's loaders refuse weights that do not fit SegMAN, naming the tensors."""
import pytest
import torch
from mmengine.runner import load_checkpoint
from mmseg.apis import init_model

from mmseg_segman.models import SegMANEncoder
from mmseg_segman.models.strict_loading import WeightsMismatchError

from ..conftest import REPO, official_keys

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


def test_matching_weights_load(model, tmp_path):
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'same.pth')
    load_checkpoint(model, str(tmp_path / 'same.pth'), map_location='cpu')
    encoder = SegMANEncoder(arch='t')
    part = {k: v for k, v in encoder.state_dict().items() if k.startswith('patch_embed.')}
    with pytest.raises(WeightsMismatchError, match='missing tensors'):
        encoder.load_state_dict(part, strict=False)  # torch's own loader is guarded too
