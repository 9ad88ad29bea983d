# The paper's recipe: AdamW 6e-5, head lr x10, no decay on norms, 1500 warm-up iterations
# then poly (power 1) to 0 at 160k iterations. mmengine applies the first matching custom key
# only, so the head's BN keeps lr x10 and weight decay, as in the release; encoder norms get no
# decay ('norm' keys as in the release, norm_decay_mult for its BN layers named otherwise).
# fused=True: PyTorch's one-kernel AdamW (the same update); the default implementation costs
# the host time per parameter tensor, and SegMAN-L has 1478 of them (docs/benchmarks.md).
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01, fused=True),
    paramwise_cfg=dict(
        norm_decay_mult=0.0,
        custom_keys={'norm': dict(decay_mult=0.0), 'head': dict(lr_mult=10.0)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, eta_min=0.0, begin=1500, end=160000, by_epoch=False),
]
# mmengine's loops, which refuse a dataset without samples by name (mmseg_segman/engine/loops.py)
train_cfg = dict(type='NonEmptyIterBasedTrainLoop', max_iters=160000, val_interval=8000)
val_cfg = dict(type='NonEmptyValLoop')
test_cfg = dict(type='NonEmptyTestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=8000, max_keep_ckpts=3,
                    save_best='mIoU'),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'),
    # random states in checkpoints, restored on --resume: resumed = uninterrupted training
    rng_state=dict(type='RNGStateHook'),
    # the config's compile (True or torch.compile's arguments) compiles the encoder and the
    # head, for training, validation and testing (mmengine alone compiles train_step only)
    compile=dict(type='CompileHook'))
