# mmseg's COCO-Stuff-164k, tested as the release does: short side 512, sides rounded up to a
# multiple of 32 (the release's AlignedResize).
_base_ = ['mmseg::_base_/datasets/coco-stuff164k.py']
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 512), keep_ratio=True),
    dict(type='ResizeToMultiple', size_divisor=32),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs')
]
train_dataloader = dict(batch_size=4, num_workers=4)
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
