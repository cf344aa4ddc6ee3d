#!/usr/bin/env bash
# Runs on the lent GPU machine (see scripts/device/pack.py, which packs what it needs into .device/):
# puts the LLM wheel together, installs the packed wheels into a venv over the image's torch, unpacks the
# toy-world weights, then measures a stage of the embedded default on one process and under the FSDP
# config (issue 7) and runs the CUDA-only tests. Logs go to $OUT (the device tool brings them back).
# A dry run on a CPU machine: OUT=/tmp/out DEVICE_STEPS=2 DEVICE_BENCH_TIMEOUT=1800 bash scripts/device/checks.sh
set -uo pipefail
OUT=${OUT:-/tmp/mmllm-device-out}
STEPS=${DEVICE_STEPS:-8}
mkdir -p "$OUT"
exec > >(tee "$OUT/checks.log") 2>&1
cd "$(dirname "$0")/../.."
D=${DEVICE_PARTS:-.device}  # where the parts are: the device tool removes .device/ between calls, so the calls copy them to /tmp

need() { [ -e "$1" ] || { echo "missing $1: the machine was given back between the carrying calls (or pack.py was not run); make the calls again, back to back"; exit 3; }; }
first=$(ls $D/part-1/*.whl.0 2>/dev/null | head -1)
need "${first:-$D/part-1/LLM-wheel.whl.0}"
wheel=$(basename "${first%.0}")
need "$D/part-2/$wheel.1"
need $D/part-2/weights.tar
need $D/part-3/wheels

set -x
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU: a dry run"
mkdir -p /tmp/mmllm-wheels
cat "$first" "$D/part-2/$wheel.1" > "/tmp/mmllm-wheels/$wheel"
PY=${DEVICE_PY:-python3}
$PY -m venv --system-site-packages --clear /tmp/mmllm-venv
V=/tmp/mmllm-venv/bin/python
# A venv made from a venv's python (the image's torch lives in /opt/torch/.venv) sees the base interpreter's
# packages, not that venv's: a .pth file adds them.
base_site=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
new_site=$($V -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
[ "$base_site" != "$new_site" ] && echo "$base_site" > "$new_site/device-base.pth"
$V -m pip install -q --no-deps --no-index /tmp/mmllm-wheels/*.whl $D/part-2/wheels/*.whl $D/part-3/wheels/*.whl
if [ ! -e mmllm/toyworld/weights/manifest.json ]; then
  mkdir -p mmllm/toyworld/weights && tar -xf $D/part-2/weights.tar -C mmllm/toyworld/weights
fi
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
$V -c "import torch, transformers, diffusers, accelerate, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__)"
set +x

echo "== issue 7: encode-align of the embedded default, one process fp32 / bf16 and the FSDP config bf16"
timeout "${DEVICE_BENCH_TIMEOUT:-420}" $V scripts/bench/distributed_default.py --stage encode_align --runs one-fp32 one-bf16 fsdp-bf16 \
  --steps "$STEPS" --out /tmp/mmllm-bench 2>&1 | tee "$OUT/encode_align_fsdp.txt"
echo "bench exit ${PIPESTATUS[0]}"
for run in /tmp/mmllm-bench/*/; do  # each run's checkpoint record of what it ran
  name=$(basename "$run"); last=$(ls -d "$run"step-* 2>/dev/null | sort -V | tail -1)
  [ -n "$last" ] && cp "$last/training_state/progress.json" "$OUT/progress-$name.json" 2>/dev/null
done

echo "== CUDA-only tests"
timeout 120 $V -m pytest -q -p no:cacheprovider tests/test_seeding.py 2>&1 | tail -5
echo "done"
