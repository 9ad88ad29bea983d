# SegMAN-L encoder on ImageNet-1k. The release ships no script for L: this is the B
# recipe (batch 8 x 256, lr 2e-3, eval crop 0.95) with drop path raised to 0.4 for the
# deeper model (our choice, not the authors').
_base_ = ['./segman-b_8xb256_in1k.py']

model = dict(
    backbone=dict(arch='l', drop_path_rate=0.4),
    head=dict(in_channels=640))
