# SegMAN-B encoder on ImageNet-1k: the release's scripts/train_base.sh (batch 8 x 256,
# lr 2e-3, drop path 0.3, layer scale, trained with --amp) and its eval crop 0.95.
_base_ = ['./segman-s_8xb256_in1k.py']

model = dict(
    backbone=dict(arch='b', drop_path_rate=0.3),
    head=dict(in_channels=560))
# timm's crop_pct 0.95: short side floor(224 / 0.95) = 235, centre crop 224
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=235, edge='short', backend='pillow', interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=224),
    dict(type='PackInputs'),
]
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
