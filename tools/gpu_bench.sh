#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md, in one command on an offline CUDA machine (Python 3.12 with torch):
#   synthetic ImageNet-shaped data -> prepare -> bench_dump (teacher resnet50) -> bench_train (student resnet50,
#   teacher resnet152). Results land in $OUT (or ./gpu-results). Needs the .devbundle/ of tools/device_bundle.sh.
#     bash tools/gpu_bench.sh                                  # about 6 minutes on one H100
#     CLASSES=100 PER_CLASS=64 TRAIN_EPOCHS=0 bash tools/gpu_bench.sh   # the dump only (both renderers, A2 views,
#                                                                        # render thread scaling): about 4 minutes
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source tools/device_env.sh || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, numba, numpy; print('torch', torch.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__, 'cpus', __import__('os').cpu_count())" | tee -a "$OUT/gpu.txt"
D=/tmp/kdcache-gpu
rm -rf $D && mkdir -p $D
CLASSES=${CLASSES:-100}; PER_CLASS=${PER_CLASS:-128}
t=$(date +%s)
python3 tools/make_synthetic_imagefolder.py $D/src --classes $CLASSES --per-class $PER_CLASS --val-per-class 4 || exit 1
python3 -m kdcache prepare imagefolder $D/src --out $D/ds --shard-size 2048 2>&1 | grep -v "it/s" || exit 1
echo "data ready in $(( $(date +%s) - t )) s" | tee -a "$OUT/gpu.txt"
python3 tools/bench_dump.py --data $D/ds --teacher resnet50 --device cuda --batch-size 256 --seeds 4 \
  --json "$OUT/bench_dump_gpu.json" 2>&1 | grep -v "it/s" | tee "$OUT/bench_dump_gpu.txt"
# the same with renderer 1 (OpenCV INTER_AREA), the before of issue 11's faster resize
python3 tools/bench_dump.py --data $D/ds --teacher resnet50 --device cuda --batch-size 256 --seeds 4 --renderer 1 \
  --skip-bytes --json "$OUT/bench_dump_gpu_renderer1.json" 2>&1 | grep -v "it/s" | tee "$OUT/bench_dump_gpu_renderer1.txt"
# A2 views (RandAugment + mixup/cutmix) with the current renderer, and the renderer alone against threads
python3 tools/bench_dump.py --data $D/ds --teacher resnet50 --device cuda --batch-size 256 --seeds 4 --a2 \
  --skip-bytes --json "$OUT/bench_dump_gpu_a2.json" 2>&1 | grep -v "it/s" | tee "$OUT/bench_dump_gpu_a2.txt"
for r in 2 1; do
  python3 tools/render_scaling.py --data $D/ds --size 224 --samples 512 --views 4 --renderer $r 2>&1 \
    | tee "$OUT/render_scaling_r$r.txt"
done
[ "${TRAIN_EPOCHS:-3}" = 0 ] && exit 0
python3 tools/bench_train.py --data $D/ds --student resnet50 --teacher resnet152 --device cuda --batch-size 256 \
  --epochs ${TRAIN_EPOCHS:-3} --rounds ${TRAIN_ROUNDS:-2} --json "$OUT/bench_train_gpu.json" 2>&1 | grep -v "it/s" \
  | grep -v -e "^round" | tee "$OUT/bench_train_gpu.txt"
