_base_ = ['./segman-t_4xb4-160k_coco-stuff164k-512x512.py']
pretrained = 'pretrained/SegMAN_Encoder_l.pth.tar'
model = dict(
    backbone=dict(arch='l', init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[96, 192, 432, 640], channels=224, feat_proj_dim=432),
)
