# The bundled toy set (tools/make_toy_dataset.py): SegMAN-T from scratch on 2 CPU cores in minutes.
_base_ = ['../_base_/models/segman.py', 'mmseg::_base_/default_runtime.py',
          '../_base_/schedules/segman_adamw_160k.py']
data_root = 'data/toy'
crop_size = (96, 96)
metainfo = dict(
    classes=('background', 'disc', 'square', 'triangle', 'bar'),
    palette=[[0, 0, 0], [220, 60, 60], [60, 200, 80], [70, 90, 230], [230, 200, 40]])
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs')
]
dataset = dict(type='BaseSegDataset', data_root=data_root, metainfo=metainfo,
               img_suffix='.png', seg_map_suffix='.png')
train_dataloader = dict(
    batch_size=8, num_workers=0,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(**dataset, data_prefix=dict(img_path='img_dir/train', seg_map_path='ann_dir/train'),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(**dataset, data_prefix=dict(img_path='img_dir/val', seg_map_path='ann_dir/val'),
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

model = dict(
    data_preprocessor=dict(size=crop_size),
    decode_head=dict(num_classes=5, loss_decode=dict(type='CrossEntropyLoss', avg_non_ignore=True)))
max_iters = 300
optim_wrapper = dict(optimizer=dict(lr=2e-3), paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.0)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=30),
    dict(type='PolyLR', power=1.0, eta_min=0.0, begin=30, end=max_iters, by_epoch=False),
]
train_cfg = dict(max_iters=max_iters, val_interval=100)
default_hooks = dict(
    logger=dict(interval=5),  # an iteration takes about 1.2 s on 2 CPU cores
    checkpoint=dict(interval=100, max_keep_ckpts=2, save_best='mIoU'),
    visualization=dict(type='SegVisualizationHook', draw=True, interval=4))
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0))
randomness = dict(seed=0)
