_base_ = ['./segman-t_4xb2-160k_cityscapes-1024x1024.py']
pretrained = 'pretrained/SegMAN_Encoder_s.pth.tar'
model = dict(
    backbone=dict(arch='s', init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[64, 144, 288, 512], channels=152, feat_proj_dim=288),
)
