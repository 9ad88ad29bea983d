_base_ = ['./segman-t_4xb2-160k_cityscapes-1024x1024.py']
pretrained = 'pretrained/SegMAN_Encoder_l.pth.tar'
model = dict(
    backbone=dict(arch='l', init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[96, 192, 432, 640], channels=224, feat_proj_dim=432),
    test_cfg=dict(mode='whole'),
)
