# Fine-tuning on another class count: SegMAN-T trained on ADE20K (150 classes) goes on to the
# toy set's 5 classes, with the toy schedule. load_from loads every tensor of the checkpoint
# but the classifier (decode_head.conv_seg), which keeps its initialisation, with a warning
# naming both shapes; any other mismatch is still refused (docs/checkpoints.md). The checkpoint:
#   mim run mmseg_segman get_release_checkpoint segman-t_4xb4-160k_ade20k-512x512
_base_ = ['./segman-t_1xb8-300i_toy-96x96.py']
load_from = 'checkpoints/segman-t_4xb4-160k_ade20k-512x512.pth'
model = dict(decode_head=dict(reinit_mismatched_classifier=True))
