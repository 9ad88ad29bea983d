_base_ = ['./segman-t_4xb4-160k_coco-stuff164k-512x512.py']
pretrained = 'pretrained/SegMAN_Encoder_b.pth.tar'
model = dict(
    backbone=dict(arch='b', init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[96, 160, 364, 560], channels=180, feat_proj_dim=320),
)
