_base_ = [
    '../_base_/models/segman.py', 'mmseg::_base_/datasets/cityscapes_1024x1024.py',
    'mmseg::_base_/default_runtime.py', '../_base_/schedules/segman_adamw_160k.py'
]
# ImageNet-1k encoder weights of the release (see docs); None trains the encoder from scratch.
pretrained = 'pretrained/SegMAN_Encoder_t.pth.tar'
crop_size = (1024, 1024)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(arch='t', init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(
        in_channels=[32, 64, 144, 192], channels=128, feat_proj_dim=192, num_classes=19),
    test_cfg=dict(mode='slide', crop_size=(1024, 1024), stride=(768, 768)),
)
train_dataloader = dict(batch_size=2)
