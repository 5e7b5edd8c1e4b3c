#!/usr/bin/env bash
# Issue 14's real-world chain on the device machine in one command of at most 9 minutes: the three
# `*-real` presets (autoencoder-real → teacher-real → distill-real, docs/training.md), each on a
# wall-clock budget (run.max_minutes) instead of a step count, with GPU-sized batches, on a crop bank
# carried with the repository. Here, beforehand (both folders are git-ignored):
#
#   bash benchmarks/device_wheels.sh         # .whl/: the packages the device image lacks (12 MB)
#   vpdsr crops ../shared/data/train .carry/crops256 --size 256 --count 900 --seed 0 --jpeg-quality 95   # 27 MB
#
# then run(command="bash benchmarks/device_train_real.sh", carry=[".whl", ".carry"], timeout_s=570).
# The same chain with a budget of about a second per stage and batches of one, on a CPU (the test that
# keeps it from rotting between device sessions, tests/test_device_train.py):
#
#   VPDSR_CHAIN_TINY=1 VPDSR_CHAIN_DATA=DIR OUT=/tmp/chain PYTHON=.venv/bin/python bash benchmarks/device_train_real.sh
#
# Writes to $OUT (at most 8 files of 16 MiB come back): student.tar (the distilled model as the
# registry entry vpdsr-small/3, fp16, tile buckets 64 and 128: `tar xf student.tar -C REGISTRY`),
# teacher.tar (resshift-real in fp16, to distil again from on a CPU), logs.tar (each stage's
# metrics.jsonl, for benchmarks/plot_losses.py) and chain.log. Settings (environment):
#   VPDSR_CHAIN_MINUTES  training minutes of the three stages (default "1 4 2": with the starts of
#                        five processes and the wheels, about 8 minutes)
#   VPDSR_CHAIN_DATA     the crop bank (default .carry/crops256)
#   VPDSR_CHAIN_WORK     scratch folder (default /tmp/vpdsr-chain, emptied first)
#   PYTHON               the interpreter (default python3: on the device, the one that has torch)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the results}"
TINY=${VPDSR_CHAIN_TINY:-0}
DATA=${VPDSR_CHAIN_DATA:-.carry/crops256}
WORK=${VPDSR_CHAIN_WORK:-/tmp/vpdsr-chain}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
rm -rf "$WORK" && mkdir -p "$WORK"
exec > >(tee -a "$OUT/chain.log") 2>&1
[ -d "$DATA" ] || { echo "no crop bank at $DATA: cut it here first (see the top of this script)"; exit 2; }

if [ "$TINY" = 1 ]; then
  read -r -a MINUTES <<< "${VPDSR_CHAIN_MINUTES:-0.02 0.02 0.02}"
  # Batches of one; the autoencoder's PatchGAN starts at its step 50, so its stage gets the
  # discriminator from the first step: every loss term runs.
  SETS=(--device cpu --set data.num_workers=0 --set data.batch_size=1)
  AE_SETS=(--set discriminator.start_step=0)
  TEACHER_SETS=()
  DISTILL_SETS=()
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  read -r -a MINUTES <<< "${VPDSR_CHAIN_MINUTES:-1 4 2}"
  # Eight times the CPU presets' batches (bf16 autocast; the degradations run on the GPU, so the
  # loader workers only decode JPEG crops). The presets' learning rates are kept.
  SETS=(--device cuda --set data.num_workers=8)
  AE_SETS=(--set data.batch_size=64)
  TEACHER_SETS=(--set data.batch_size=32)
  DISTILL_SETS=(--set data.batch_size=16)
  # The project's own wheel brings the `vpdsr` entry points; the checkout stays first on the path.
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
export PYTHONUNBUFFERED=1
VPDSR=("$PYTHON" -m model.cli)
R="$WORK/registry"
START=$SECONDS

# stage NAME MINUTES ARGS...: one `vpdsr train` stage, its run folder under $WORK/runs/NAME.
stage() {
  local name=$1 minutes=$2
  shift 2
  echo "== $name: ${minutes} min of training, at $((SECONDS - START)) s"
  "${VPDSR[@]}" train "$name" --registry "$R" --data "$DATA" --out "$WORK/runs/$name" \
    --set run.max_minutes="$minutes" --set run.steps=1000000 --set run.log_every=10 "${SETS[@]}" "$@"
}

# ship REF TAR [ARGS]: the registry entry REF in fp16 as $OUT/TAR, as soon as it exists, so that a
# later stage that fails or runs out of time does not lose it.
ship() {
  local ref=$1 tar=$2
  shift 2
  "${VPDSR[@]}" registry copy "$ref" --from "$R" --registry "$WORK/ship" --dtype float16 "$@"
  tar -cf "$OUT/$tar" -C "$WORK/ship" "${ref%%:*}"
}
pack_logs() { (cd "$WORK/runs" 2>/dev/null && tar -cf "$OUT/logs.tar" ./*/metrics.jsonl) || true; }
trap pack_logs EXIT

"${VPDSR[@]}" registry copy vpdsr-small:2 --from registry --registry "$R" --version 2
stage autoencoder "${MINUTES[0]}" --config autoencoder-real "${AE_SETS[@]}"
stage teacher "${MINUTES[1]}" --config teacher-real --autoencoder vq-f4-real "${TEACHER_SETS[@]}"
ship resshift-real:1 teacher.tar
stage distill "${MINUTES[2]}" --config distill-real --teacher resshift-real "${DISTILL_SETS[@]}"
ship vpdsr-small:3 student.tar --version 3 --tile-sizes 64,128
echo "== chain: $((SECONDS - START)) s"
