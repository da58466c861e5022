#!/bin/bash
# Target 8 on a GPU machine: batch-1 latency of the tuned EAT point against the static model on SST-2 dev (all 872
# rows), timed side by side (interleaved, warm-up, medians), accuracy from the same calls; plus batch-32 throughput.
#
# Here (CPU machine), once:  .venv/bin/python benchmarks/gpu_pack.py --run runs/sent/eat-mean-frozen \
#                                --tuned results/sst2-sent-mean-frozen/tuned_sst2.json --out .gpu
#                            echo /.gpu/ >> .git/info/exclude       # the pack travels as a carried path, not in git
# There (device tool):       run(command="bash benchmarks/gpu_t8.sh .gpu $OUT", carry=[".gpu"], timeout_s=480)
# Dry run here on CPU:       DEVICE=cpu ROWS=40 bash benchmarks/gpu_t8.sh .gpu /tmp/t8
#
# The GPU machine has PyTorch, transformers, typer, rich, pandas, scikit-learn and scipy but not this project
# installed, so it runs from src/ (PYTHONPATH). The model travels in float16 and runs in float16 (static and EAT
# alike: the same weights, the static model is the EAT model with exits off).
set -euo pipefail
PACK=${1:?usage: gpu_t8.sh PACK_DIR OUT_DIR}
OUT_DIR=${2:?usage: gpu_t8.sh PACK_DIR OUT_DIR}
DEVICE=${DEVICE:-cuda}
ROWS=${ROWS:-}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" EAT_DATA_DIR="$PACK/glue" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# the results folder stays outside OUT_DIR (the device tool returns at most 8 files); the files that matter are copied
RESULTS=${RESULTS:-$(mktemp -d)/t8}
mkdir -p "$RESULTS" "$OUT_DIR"
cp "$PACK"/tuned_sst2*.json "$RESULTS/"
{
  date -u
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
  if [ "$DEVICE" != cpu ]; then nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv; fi
} 2>&1 | tee "$OUT_DIR/environment.txt"
"$PY" -m eat.cli bench --checkpoint "$PACK/eat" --static "$PACK/eat" --task sst2 --preset paper --points tuned \
  --device "$DEVICE" --results "$RESULTS" ${ROWS:+--rows $ROWS} --force 2>&1 | tee "$OUT_DIR/bench.log"
"$PY" benchmarks/targets.py --t8 --results "$RESULTS" --task sst2 --out "$OUT_DIR/targets_sst2_gpu.txt"
cp "$RESULTS/results.jsonl" "$OUT_DIR/results_gpu.jsonl"
ls "$OUT_DIR"
