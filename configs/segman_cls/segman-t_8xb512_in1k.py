# SegMAN-T encoder on ImageNet-1k, the recipe of the authors' release (train.py and
# scripts/train_tiny.sh): 300 + 10 cool-down epochs, AdamW (wd 0.05, none on 1-D parameters),
# lr 1e-3 per 1024 images, 5 warm-up epochs from 1e-6, cosine to 1e-5, RandAugment
# rand-m9-mstd0.5-inc1, random erasing 0.25, Mixup 0.8 / CutMix 1.0, label smoothing 0.1,
# grad-norm clip 5, EMA decay 0.99984, eval crop 0.9. Batch 8 x 512 as released.
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
    'mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmseg_segman.models.classification'], allow_failed_imports=False)

model = dict(
    type='ImageClassifier',
    backbone=dict(type='SegMANEncoder', arch='t', out_indices=(3, ), drop_path_rate=0.0),
    head=dict(
        type='SegMANClsHead',
        num_classes=1000,
        in_channels=192,
        hidden_channels=1024,
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original')),
    train_cfg=dict(augments=[dict(type='Mixup', alpha=0.8), dict(type='CutMix', alpha=1.0)]),
)

# eval: resize the short side to floor(224 / crop_pct), centre crop 224 (timm's crop_pct 0.9)
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=248, edge='short', backend='pillow', interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=224),
    dict(type='PackInputs'),
]
train_dataloader = dict(batch_size=512)
val_dataloader = dict(batch_size=256, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(
    optimizer=dict(lr=1e-3 * 4096 / 1024),
    # timm's rule in the release: no decay on 1-D parameters (biases, norms, Ds)
    paramwise_cfg=dict(_delete_=True, flat_decay_mult=0.0),
    clip_grad=dict(max_norm=5.0))
# timm's scheduler: cosine over 300 epochs, then 10 cool-down epochs at the minimum
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, end=5, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=5, end=300),
]
train_cfg = dict(max_epochs=310)

# timm's model EMA with decay 0.99984 per step; checkpoints hold the EMA weights in
# `state_dict` (the raw ones in `ema_state_dict`)
custom_hooks = [dict(type='EMAHook', momentum=1.6e-4, priority='ABOVE_NORMAL')]
default_hooks = dict(checkpoint=dict(interval=1, max_keep_ckpts=3, save_best='auto'))
# `--auto-scale-lr` keeps the release's 1e-3 per 1024 images at another total batch
auto_scale_lr = dict(base_batch_size=4096)
