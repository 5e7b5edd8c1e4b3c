#!/usr/bin/env bash
# Issue 16's GPU measurements in one command of at most 8 minutes (benchmarks/device_suite.py
# says what each part measures). Every part runs in its own process under a time budget; one
# that fails or overruns is recorded in gpu.json's "errors" and the suite goes on.
#
#   OUT=/path bash benchmarks/device_suite.sh                        # on the device machine
#   VPDSR_SUITE_TINY=1 OUT=/tmp/suite PYTHON=.venv/bin/python bash benchmarks/device_suite.sh
#                                                                    # the same with tiny models on a CPU
#
# Writes $OUT/gpu.json, $OUT/gpu.md, $OUT/suite.log and $OUT/server.log. Settings (environment):
#   VPDSR_SUITE_COMPILE  VPDSR_COMPILE of the server and the optimised path (default reduce-overhead;
#                        off in tiny mode)
#   VPDSR_SUITE_SECONDS  the whole suite's budget (default 480)
#   VPDSR_SUITE_PARTS    which parts, in order (default "prepare http train model"; the others
#                        need prepare's registries)
#   VPDSR_SUITE_WORK     scratch folder (default /tmp/vpdsr-suite, emptied first)
#   PYTHON               the interpreter (default python3: on the device, the one that has torch)
# On the device, the packages its image lacks come from the wheels in .whl/, which
# benchmarks/device_wheels.sh downloads here beforehand; the run tool carries that folder.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for gpu.json and gpu.md}"
TINY=${VPDSR_SUITE_TINY:-0}
COMPILE=${VPDSR_SUITE_COMPILE:-$([ "$TINY" = 1 ] && echo off || echo reduce-overhead)}
TOTAL_S=${VPDSR_SUITE_SECONDS:-480}
WORK=${VPDSR_SUITE_WORK:-/tmp/vpdsr-suite}
PYTHON=${PYTHON:-python3}
START=$SECONDS
mkdir -p "$OUT"
rm -rf "$WORK" && mkdir -p "$WORK"
exec > >(tee -a "$OUT/suite.log") 2>&1

if [ "$TINY" = 1 ]; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  # The project's own wheel brings the `vpdsr` command entry points; the checkout stays first on
  # the path, so its code is what runs.
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "== wheels: install failed (the parts that need them will record errors)"
  export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
FLAGS=(--work "$WORK" --compile "$COMPILE")
[ "$TINY" = 1 ] && FLAGS+=(--tiny)

# part NAME CAP: run one part for at most CAP seconds and no later than 45 s before the suite's
# end. Past its budget a part starts nothing new; 15 s later `timeout` interrupts it (SIGINT: it
# saves what it has and stops its server), 15 s after that it is killed: so even a part stuck in
# a compilation leaves the 15 s that merge needs.
part() {
  local name=$1 cap=$2
  local left=$((TOTAL_S - (SECONDS - START) - 45))
  local budget=$((cap < left ? cap : left))
  if ((budget < 5)); then
    echo "== $name: skipped, the suite's time is spent"
    return
  fi
  echo "== $name: budget ${budget} s, at $((SECONDS - START)) s"
  timeout -s INT -k 15 $((budget + 15)) "$PYTHON" benchmarks/device_suite.py "$name" --budget "$budget" "${FLAGS[@]}"
  echo "== $name: exit $?, at $((SECONDS - START)) s"
}

declare -A CAPS=([prepare]=60 [http]=180 [train]=90 [model]=$TOTAL_S)   # model: whatever is left
for name in ${VPDSR_SUITE_PARTS:-prepare http train model}; do
  part "$name" "${CAPS[$name]}"
done
"$PYTHON" benchmarks/device_suite.py merge "${FLAGS[@]}" --out "$OUT" \
  --command "VPDSR_SUITE_COMPILE=$COMPILE VPDSR_SUITE_TINY=$TINY bash benchmarks/device_suite.sh"
status=$?
cp "$WORK/server.log" "$OUT/server.log" 2>/dev/null
echo "== suite: $((SECONDS - START)) s"
cat "$OUT/gpu.md"
exit $status
