# SegMAN: LASS encoder + MMSCopE decoder. Sizes override backbone.arch and the head widths
# (mmseg_segman/models/variants.py holds them; tests/test_configs.py checks every config).
custom_imports = dict(imports=['mmseg_segman'], allow_failed_imports=False)
norm_cfg = dict(type='SyncBN', requires_grad=True)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255)
model = dict(
    type='SegMANEncoderDecoder',  # EncoderDecoder that checks the head fits the encoder at build time
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='SegMANEncoder',
        arch='t',
        drop_path_rate=0.0,
        with_cp=False,
        cuda_graph=True,  # training steps and inference replay CUDA graphs (docs/cuda_graphs.md)
        norm_cfg=norm_cfg),
    decode_head=dict(
        type='SegMANHead',
        in_channels=[32, 64, 144, 192],
        in_index=[0, 1, 2, 3],
        channels=128,
        feat_proj_dim=192,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        cuda_graph=True,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
