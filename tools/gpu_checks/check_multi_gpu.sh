#!/usr/bin/env bash
# mmseg's own launchers on several GPUs, run as docs/multi_gpu.md tells a user to run them:
#
#   bash tools/gpu_checks/check_multi_gpu.sh GPUS WORK_DIR [ITERS] [PARTS]
#
# PARTS: "toy", "ade" or "toy,ade" (the default), the runs below:
#
# 1. the toy config (tools/make_toy_dataset.py): dist_train.sh on GPUS GPUs (SyncBN across
#    them, 8 images a GPU) for TOY_ITERS iterations (default 300, the config's), --resume
#    for 20 more, then dist_test.sh of the last checkpoint: the test mIoU;
# 2. the released ADE20K recipe of SegMAN-B (segman-b_4xb4-160k_ade20k-512x512.py: 4 images of
#    512x512 a GPU, SyncBN) on a fake ADE20K tree (random images in ADE20K's layout, the
#    encoder from scratch), ITERS iterations (default 60) through torchrun on GPUS GPUs, then
#    --resume under torchrun for 20 more, dist_test.sh, and the ITERS iterations through
#    train.py on one GPU (seconds an iteration against the GPUS GPUs' own);
# prints the mmengine log lines of each run (seconds an iteration: "time") and the mIoUs.
# Needs the OpenMMLab stack (tools/gpu_checks/setup_device.sh on the lent GPU machine).
set -uo pipefail
USAGE="usage: check_multi_gpu.sh GPUS WORK_DIR [ITERS] [PARTS]"
GPUS=${1:?$USAGE}
WORK=${2:?$USAGE}
ITERS=${3:-60}
PARTS=${4:-toy,ade}
TOY_ITERS=${TOY_ITERS:-300}  # the toy config's schedule
TOOLS=$(python3 -c 'import mmseg, os; print(os.path.dirname(mmseg.__file__) + "/.mim/tools")')
mkdir -p "$WORK"
step() { echo "[check_multi_gpu] $(date +%T) $*"; }
summary() {  # the iteration lines and metrics of a log
    grep -E "Iter\((train|val|test)\)|mIoU|Error|error:|Traceback" "$1" | grep -v "^\s*$" | tail -n "${2:-8}"
}

if [[ ",$PARTS," == *,toy,* ]]; then
TOY=configs/segman/segman-t_1xb8-300i_toy-96x96.py
TOY_RESUMED=$((TOY_ITERS + 20))
step "toy data and dist_train.sh of the toy config on $GPUS GPUs, $TOY_ITERS iterations"
python3 tools/make_toy_dataset.py data/toy > /dev/null
bash "$TOOLS/dist_train.sh" "$TOY" "$GPUS" --work-dir "$WORK/toy" \
    --cfg-options train_cfg.max_iters=$TOY_ITERS > "$WORK/toy_train.log" 2>&1
echo "toy train rc $?"; summary "$WORK/toy_train.log"
step "dist_train.sh --resume: 20 more iterations on $GPUS GPUs"
bash "$TOOLS/dist_train.sh" "$TOY" "$GPUS" --work-dir "$WORK/toy" --resume \
    --cfg-options train_cfg.max_iters=$TOY_RESUMED > "$WORK/toy_resume.log" 2>&1
echo "toy resume rc $?"; grep -E "[Rr]esumed" "$WORK/toy_resume.log" | tail -n 2
summary "$WORK/toy_resume.log" 4
step "dist_test.sh of iter_$TOY_RESUMED.pth on $GPUS GPUs"
bash "$TOOLS/dist_test.sh" "$TOY" "$WORK/toy/iter_$TOY_RESUMED.pth" "$GPUS" --work-dir "$WORK/toy_test" \
    > "$WORK/toy_test.log" 2>&1
echo "toy test rc $?"; summary "$WORK/toy_test.log" 4
fi
[[ ",$PARTS," == *,ade,* ]] || { step done; exit 0; }

step "fake ADE20K tree (data/ade/ADEChallengeData2016: 64 training and 16 validation images)"
python3 - <<'PYTHON'
from pathlib import Path
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
root = Path('data/ade/ADEChallengeData2016')
for split, count in (('training', 64), ('validation', 16)):
    (root / 'images' / split).mkdir(parents=True, exist_ok=True)
    (root / 'annotations' / split).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        # blocks of 32x32 pixels, each of one class (0: ignored, 1-150) and one colour
        labels = rng.integers(0, 151, (16, 22), dtype=np.uint8)
        colours = rng.integers(0, 256, (151, 3), dtype=np.uint8)[labels]
        big = lambda a: np.kron(a, np.ones((32, 32) + (1,) * (a.ndim - 2), dtype=np.uint8))[:512, :683]
        name = f'ADE_{split[:5]}_{i:08d}'
        Image.fromarray(big(colours)).save(root / 'images' / split / f'{name}.jpg')
        Image.fromarray(big(labels)).save(root / 'annotations' / split / f'{name}.png')
PYTHON
ADE=configs/segman/segman-b_4xb4-160k_ade20k-512x512.py
OPTS="model.backbone.init_cfg=None train_cfg.max_iters=$ITERS train_cfg.val_interval=$ITERS
default_hooks.logger.interval=10 default_hooks.checkpoint.interval=$ITERS"

step "torchrun: the ADE20K recipe of SegMAN-B on $GPUS GPUs, $ITERS iterations"
torchrun --nproc_per_node="$GPUS" --master_port=29511 "$TOOLS/train.py" "$ADE" --launcher pytorch \
    --work-dir "$WORK/ade_dist" --cfg-options $OPTS > "$WORK/ade_dist.log" 2>&1
echo "ade dist train rc $?"; summary "$WORK/ade_dist.log" 10

step "torchrun --resume: 20 more iterations on $GPUS GPUs"
RESUMED=$((ITERS + 20))
torchrun --nproc_per_node="$GPUS" --master_port=29512 "$TOOLS/train.py" "$ADE" --launcher pytorch \
    --work-dir "$WORK/ade_dist" --resume --cfg-options $OPTS train_cfg.max_iters=$RESUMED \
    train_cfg.val_interval=$RESUMED > "$WORK/ade_resume.log" 2>&1
echo "ade resume rc $?"; grep -E "[Rr]esumed|Load checkpoint" "$WORK/ade_resume.log" | tail -n 2
summary "$WORK/ade_resume.log" 4

step "dist_test.sh of the resumed checkpoint on $GPUS GPUs"
bash "$TOOLS/dist_test.sh" "$ADE" "$WORK/ade_dist/iter_$RESUMED.pth" "$GPUS" --work-dir "$WORK/ade_test" \
    --cfg-options model.backbone.init_cfg=None > "$WORK/ade_test.log" 2>&1
echo "ade test rc $?"; summary "$WORK/ade_test.log" 4

step "train.py: the same on one GPU"
python3 "$TOOLS/train.py" "$ADE" --work-dir "$WORK/ade_one" --cfg-options $OPTS > "$WORK/ade_one.log" 2>&1
echo "ade one-GPU train rc $?"; summary "$WORK/ade_one.log" 10

step done
