# SegMAN-S encoder on ImageNet-1k: the release's scripts/train_small.sh (batch 8 x 256,
# lr 2e-3, drop path 0.15, trained with --amp); the rest as segman-t_8xb512_in1k.py.
_base_ = ['./segman-t_8xb512_in1k.py']

model = dict(
    backbone=dict(arch='s', drop_path_rate=0.15),
    head=dict(in_channels=512))
train_dataloader = dict(batch_size=256)
val_dataloader = dict(batch_size=128)
test_dataloader = val_dataloader
optim_wrapper = dict(optimizer=dict(lr=1e-3 * 2048 / 1024))
auto_scale_lr = dict(base_batch_size=2048)
