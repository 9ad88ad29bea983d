# SegMAN-T on ADE20K with bf16 mixed precision (mmengine's AmpOptimWrapper); for fp16 use
# dtype='float16' or mmseg's `tools/train.py CONFIG --amp`. See docs/benchmarks.md.
_base_ = './segman-t_4xb4-160k_ade20k-512x512.py'
optim_wrapper = dict(type='AmpOptimWrapper', dtype='bfloat16', loss_scale='dynamic')
