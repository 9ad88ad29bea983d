#!/usr/bin/env bash
# The main job: set up .venv, generate the bundled toy dataset, train SegMAN-T on it with
# mmseg's own tools/train.py on the CPU, evaluate the best checkpoint with tools/test.py, and
# draw input, ground truth and prediction of validation images into one picture.
#
#   bash tools/run_demo.sh             # WORK_DIR=work_dirs/segman-t_toy by default
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup_env.sh
PY="$ROOT/.venv/bin/python"
MMSEG_TOOLS="$("$PY" -c 'import mmseg, os; print(os.path.join(os.path.dirname(mmseg.__file__), ".mim", "tools"))')"
CONFIG=configs/segman/segman-t_1xb8-300i_toy-96x96.py
WORK_DIR="${WORK_DIR:-work_dirs/segman-t_toy}"

"$PY" tools/make_toy_dataset.py data/toy
echo "[run_demo] training $CONFIG (about 6-8 minutes on 2 CPU cores)"
"$PY" "$MMSEG_TOOLS/train.py" "$CONFIG" --work-dir "$WORK_DIR"
CHECKPOINT="$(ls -t "$WORK_DIR"/best_mIoU_iter_*.pth | head -n 1)"
echo "[run_demo] testing $CHECKPOINT"
"$PY" "$MMSEG_TOOLS/test.py" "$CONFIG" "$CHECKPOINT" --work-dir "$WORK_DIR/test" \
    --show-dir "$(realpath -m "$WORK_DIR/overlays")" --cfg-options default_hooks.visualization.interval=1 \
    2>&1 | tee "$WORK_DIR/test.log"
"$PY" tools/visualize_predictions.py "$CONFIG" "$CHECKPOINT" --out-file "$WORK_DIR/predictions.png" \
    --num-images 6 --tile 256
cat <<DONE
[run_demo] done
  training log and config:  $(ls -td "$WORK_DIR"/2*/ | head -n 1)
  checkpoints:              $WORK_DIR/*.pth (best: $CHECKPOINT)
  test mIoU:                $(grep -o 'mIoU: [0-9.]*' "$WORK_DIR/test.log" | tail -n 1)
  the picture:              $WORK_DIR/predictions.png (input, ground truth, prediction)
  overlays of every image:  $WORK_DIR/overlays/vis_data/vis_image/
DONE
