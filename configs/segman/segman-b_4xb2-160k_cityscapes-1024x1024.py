_base_ = ['./segman-t_4xb2-160k_cityscapes-1024x1024.py']
pretrained = 'pretrained/SegMAN_Encoder_b.pth.tar'
model = dict(
    backbone=dict(arch='b', init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[96, 160, 364, 560], channels=180, feat_proj_dim=320),
)
