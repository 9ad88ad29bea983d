_base_ = ['./segman-t_4xb4-160k_ade20k-512x512.py']
pretrained = 'pretrained/SegMAN_Encoder_s.pth.tar'
model = dict(
    backbone=dict(arch='s', init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[64, 144, 288, 512], channels=144, feat_proj_dim=288),
)
