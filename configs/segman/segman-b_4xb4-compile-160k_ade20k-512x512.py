# SegMAN-B on ADE20K with torch.compile (docs/compile.md): mmengine compiles the training step
# (512x512 crops: one shape). Validation stays eager: ADE20K's images come in many sizes, and
# torch 2.11's inductor fails on the dynamic graph a second size asks for; drop the
# compile_eval line to compile validation and testing too.
_base_ = './segman-b_4xb4-160k_ade20k-512x512.py'
compile = True
default_hooks = dict(compile_eval=None)
