#!/usr/bin/env bash
# The GPU check on the device tool's machine (benchmarks/gpu_check.py says what it does).
#
# Here first: `make gpu-bundle` (packs .gpu-bundle/). Then, from the repository root of the
# session's checkout, through the device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu-bundle"], timeout_s=540)
# The report comes back as $OUT/gpu-check.json, the log as $OUT/gpu-check.log.
# On this CPU: PY=.venv/bin/python bash benchmarks/gpu_check.sh --cpu-smoke
# Arguments go to `gpu_check.py run`.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
BUNDLE=${BUNDLE:-.gpu-bundle}
OUT=${OUT:-build/gpu-check}
mkdir -p "$OUT"
[ -f "$BUNDLE/expected.json" ] || { echo "no $BUNDLE/expected.json: run make gpu-bundle first"; exit 2; }
# The device machine's image has no pydantic (wire.py needs it): the bundle carries its wheels.
if ! "$PY" -c "import pydantic" 2>/dev/null; then
  SITE=$(mktemp -d /tmp/gpu-check-site.XXXX)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    "$BUNDLE"/wheels/*.whl || exit 2
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
"$PY" benchmarks/gpu_check.py run --bundle "$BUNDLE" --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu-check.log"
