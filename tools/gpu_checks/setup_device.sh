# Set up the OpenMMLab stack on the lent GPU machine (torch and triton are there, nothing else).
#
#   source tools/gpu_checks/setup_device.sh        # from the repository root, .whl/ carried
#
# .whl/ (ignored by git) holds, for Python 3.12: the wheels of mmengine 0.10.7,
# mmsegmentation 1.2.2 and their pure-Python needs (docs/benchmarks.md has the pip download
# line), and either the mmcv 2.1.0 sdist or an mmcv wheel this script built earlier (kept as
# .whl/mmcv-wheel.part-* pieces, since a file coming back from the machine is at most 16 MiB).
# mmcv is built with the GPU hidden: mmseg needs only its CPU ops. With $OUT set, a freshly
# built wheel is also written there in pieces, to be carried next time. The inductor cache
# (FlexAttention's compiled kernels) lives in .whl/inductor-cache.tgz.part-* the same way
# (made by: tar -czf - -C /tmp/inductor-cache . | split -b 15M -d - $OUT/inductor-cache.tgz.part-),
# and Triton's compiled kernels (SegMAN's own, minutes to compile on a cold machine) in
# .whl/triton-cache.tgz.part-* from /tmp/triton-cache (made by:
# python3 tools/gpu_checks/pack_triton_cache.py /tmp/triton-cache $OUT/triton-cache.tgz.part-
# --read-since $START, START the call's start in seconds since the epoch: only the kernels
# the call used).
set -e
SITE=/tmp/site
mkdir -p "$SITE"
if [ ! -d "$SITE/mmseg" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$SITE" $(ls .whl/*.whl | grep -v '/mmcv-') >/dev/null
fi
if ls .whl/mmcv-wheel.part-* >/dev/null 2>&1; then
    mkdir -p /tmp/mmcv-wheel
    cat .whl/mmcv-wheel.part-* > /tmp/mmcv-wheel/mmcv-2.1.0-cp312-cp312-linux_x86_64.whl
else
    echo "[setup_device] building mmcv 2.1.0 (CPU ops, C++20)"
    rm -rf /tmp/mmcv-src && mkdir -p /tmp/mmcv-src
    tar -xzf .whl/mmcv-2.1.0.tar.gz -C /tmp/mmcv-src
    sed -i 's/-std=c++17/-std=c++20/' /tmp/mmcv-src/mmcv-2.1.0/setup.py
    (cd /tmp/mmcv-src/mmcv-2.1.0 && CUDA_VISIBLE_DEVICES= MMCV_WITH_OPS=1 FORCE_CUDA=0 \
        MAX_JOBS=$(nproc) python3 -m pip wheel -q --no-build-isolation --no-deps \
        -w /tmp/mmcv-wheel . >/tmp/mmcv-build.log 2>&1) || { tail -30 /tmp/mmcv-build.log; exit 1; }
    # without debug information the extension shrinks from about 80 MB to 4 MB
    python3 - /tmp/mmcv-wheel/mmcv-*.whl <<'PYTHON'
import subprocess, sys, tempfile, zipfile
from pathlib import Path
wheel = Path(sys.argv[1])
with tempfile.TemporaryDirectory() as tmp:
    zipfile.ZipFile(wheel).extractall(tmp)
    for so in Path(tmp).rglob('*.so'):
        subprocess.run(['strip', '--strip-debug', str(so)], check=True)
    with zipfile.ZipFile(wheel, 'w', zipfile.ZIP_DEFLATED) as out:
        for f in sorted(Path(tmp).rglob('*')):
            if f.is_file():
                out.write(f, f.relative_to(tmp))
PYTHON
    if [ -n "$OUT" ]; then
        split -b 15M -d /tmp/mmcv-wheel/mmcv-*.whl "$OUT/mmcv-wheel.part-"
    fi
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" /tmp/mmcv-wheel/mmcv-*.whl >/dev/null
export PYTHONPATH="$SITE:$PWD"
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache TRITON_CACHE_DIR=/tmp/triton-cache
for cache in inductor triton; do
    if ls .whl/$cache-cache.tgz.part-* >/dev/null 2>&1; then
        mkdir -p /tmp/$cache-cache
        cat .whl/$cache-cache.tgz.part-* | tar -xzf - -C /tmp/$cache-cache
        # accessed in 1970: a kernel read in this call gets a new access time, which
        # pack_triton_cache.py --read-since sees
        find /tmp/$cache-cache -type f -exec touch -a -d @1 {} +
    fi
done
python3 -c 'import mmcv.ops, mmseg, torch; print("[setup_device] mmcv", mmcv.__version__, "mmseg", mmseg.__version__, "torch", torch.__version__, torch.cuda.get_device_name())'
set +e
