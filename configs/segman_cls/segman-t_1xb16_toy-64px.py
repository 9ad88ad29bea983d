# SegMAN-T from scratch on the bundled toy set (tools/make_toy_cls_dataset.py data/toy_cls):
# 4 classes, 64 train / 32 val images of 64x64; a couple of minutes on 2 CPU cores.
# The ImageNet recipe minus what a 64-image set cannot use (Mixup/CutMix, RandAugment,
# random erasing), with a short schedule and a fast EMA.
_base_ = ['./segman-t_8xb512_in1k.py']

data_root = 'data/toy_cls'
num_classes = 4
max_epochs = 30

data_preprocessor = dict(num_classes=num_classes)
model = dict(head=dict(num_classes=num_classes), train_cfg=None)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomFlip', prob=[0.25, 0.25], direction=['horizontal', 'vertical']),
    dict(type='PackInputs'),
]
test_pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
train_dataloader = dict(
    batch_size=16, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, type='CustomDataset', data_root=data_root, data_prefix='train',
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=16, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, type='CustomDataset', data_root=data_root, data_prefix='val',
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator

optim_wrapper = dict(optimizer=dict(lr=2e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, end=2, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=2, end=max_epochs,
         convert_to_iter_based=True),
]
train_cfg = dict(max_epochs=max_epochs, val_interval=10)
auto_scale_lr = dict(base_batch_size=16)

custom_hooks = [dict(type='EMAHook', momentum=0.05, priority='ABOVE_NORMAL')]
default_hooks = dict(
    logger=dict(interval=4),
    checkpoint=dict(interval=max_epochs, max_keep_ckpts=1, save_best=None))
randomness = dict(seed=0)
