# SegMAN-B on Cityscapes with torch.compile (docs/compile.md): the segman configs' CompileHook
# compiles the encoder and the decode head for training, validation and testing. Cityscapes'
# shapes are fixed (1024x1024 crops, 1024x1024 slide windows over 1024x2048 images), so each
# compiles once. Compiled training's gradients are not yet verified against eager ones on the
# GPU (docs/compile.md): until they are, prefer the eager config for training.
_base_ = './segman-b_4xb2-160k_cityscapes-1024x1024.py'
compile = True
