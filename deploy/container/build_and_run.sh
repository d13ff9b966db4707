#!/usr/bin/env bash
# Build the CPU Bento's container image on a machine without Docker Hub, run it, transcribe jfk.
#
#   nice -n 10 deploy/container/build_and_run.sh            # from the repository root, as root
#
# 1. the Bento: `bentowhisper models import base`, `bentoml build -f bentofile.cpu.yaml`, in a
#    BENTOML_HOME of its own under $WORK;
# 2. the base image its Dockerfile starts FROM (python:3.11-slim): Debian bookworm made with
#    mmdebstrap from Debian's mirror (python3 3.11, pip, ca-certificates), imported into podman
#    and tagged docker.io/library/python:3.11-slim, so the build never pulls;
# 3. `bentoml containerize --backend podman` with chroot isolation (podman's crun refuses this
#    machine's hybrid cgroups for builds); the requirements' PyTorch CPU index is unreachable
#    here, so a local stand-in (torch_index.py) serves the local torch CPU wheel under that
#    name, over TLS with a CA made for this build. The build's RUN steps see the host's CA
#    bundle plus that CA (a volume over /etc/ssl/certs/ca-certificates.crt): pip and uv then
#    trust the stand-in and whatever proxy the host's bundle trusts; the image keeps Debian's;
# 4. the image runs (`podman run`, else its root filesystem in a chroot), and the openai SDK
#    transcribes jfk through it.
# Each step logs to $WORK/*.log; the last lines say what ran and what came back.
set -Eeuo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${WORK:-/tmp/bentowhisper-container}  # outside the repository: bentoml build walks it
PY=${PY:-$REPO/.venv/bin/python}
BENTOML=${BENTOML:-$REPO/.venv/bin/bentoml}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
TORCH_WHEEL=${TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -1)}
IMAGE=${IMAGE:-localhost/bentowhisper-cpu:local}
BASE_TAG=docker.io/library/python:3.11-slim
HOST_CA_BUNDLE=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
PORT=${PORT:-3300}
JFK=${JFK:-$REPO/../shared/eval/audio/en_misc/jfk.flac}
export BENTOML_HOME=$WORK/bentoml-home BENTOML_DO_NOT_TRACK=true PYTHONPATH=$REPO/src

mkdir -p "$WORK"
step() { echo "== $(date -u +%H:%M:%S) $*"; }

step "tools"
for tool in mmdebstrap podman openssl; do
  command -v $tool >/dev/null || { apt-get update -q && apt-get install -y -q mmdebstrap podman openssl; break; }
done
[ -n "$TORCH_WHEEL" ] || { echo "no torch 2.13.0+cpu wheel (set TORCH_WHEEL)"; exit 1; }

step "bento (models import base, bentoml build -f bentofile.cpu.yaml)"
(cd "$REPO" && "$PY" -m bentowhisper.cli models import base \
  && BENTOWHISPER_BENTO_MODEL=whisper-base:latest "$BENTOML" build -f bentofile.cpu.yaml --output tag) \
  >"$WORK/bento.log" 2>&1 || { tail -20 "$WORK/bento.log"; exit 1; }
TAG=$(sed -n 's/^__tag__://p' "$WORK/bento.log" | tail -1)
grep -q "^FROM $(basename $BASE_TAG)" "$BENTOML_HOME/bentos/${TAG%%:*}/${TAG#*:}/env/docker/Dockerfile" \
  || { echo "the Dockerfile does not start FROM $(basename $BASE_TAG):"; grep ^FROM "$BENTOML_HOME"/bentos/*/*/env/docker/Dockerfile; exit 1; }
echo "bento $TAG"

step "build CA and certificate for the stand-in download.pytorch.org"
if [ ! -f "$WORK/ca.pem" ]; then
  openssl req -x509 -newkey rsa:2048 -nodes -days 7 -subj "/CN=bentowhisper build CA" \
    -keyout "$WORK/ca.key" -out "$WORK/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=download.pytorch.org" \
    -keyout "$WORK/server.key" -out "$WORK/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:download.pytorch.org\n' >"$WORK/san.ext"
  openssl x509 -req -in "$WORK/server.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" \
    -CAcreateserial -days 7 -extfile "$WORK/san.ext" -out "$WORK/server.pem" 2>/dev/null
fi

step "base image $BASE_TAG from Debian bookworm (mmdebstrap)"
if ! podman image exists $BASE_TAG; then
  # python:3.11-slim has python and pip on PATH and lets pip install into the system Python
  # (the Dockerfile pip-installs uv): drop Debian's EXTERNALLY-MANAGED marker and add the names.
  mmdebstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
    --customize-hook='rm -f "$1"/usr/lib/python3.11/EXTERNALLY-MANAGED' \
    --customize-hook='ln -sf /usr/bin/python3 "$1"/usr/local/bin/python' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    bookworm "$WORK/base.tar" "$MIRROR" >"$WORK/mmdebstrap.log" 2>&1 || { tail -20 "$WORK/mmdebstrap.log"; exit 1; }
  # uv verifies TLS against its bundled roots unless SSL_CERT_FILE names a bundle.
  podman import --change 'ENV LANG=C.UTF-8' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' "$WORK/base.tar" $BASE_TAG >"$WORK/import.log" 2>&1
fi
echo "base: $(podman image inspect --format '{{.Id}} {{.Size}}' $BASE_TAG)"

step "stand-in for https://download.pytorch.org/whl/cpu (torch_index.py)"
"$PY" "$REPO/deploy/container/torch_index.py" --wheel "$TORCH_WHEEL" \
  --cert "$WORK/server.pem" --key "$WORK/server.key" >"$WORK/torch_index.log" 2>&1 &
INDEX_PID=$!
SERVER_PID=
cleanup() {
  set +e  # every step, whatever failed before
  kill $INDEX_PID 2>/dev/null || true
  if [ -n "$SERVER_PID" ]; then
    kill -INT -- -$SERVER_PID 2>/dev/null
    sleep 5
    kill -KILL -- -$SERVER_PID 2>/dev/null
  fi
  if [ -n "$ROOT" ]; then  # never with an empty ROOT: that would unmount the host's /proc
    # BentoML's workers leave the process group: end whatever still runs in that root
    for p in /proc/[0-9]*; do
      [ "$(readlink "$p/root" 2>/dev/null)" = "$ROOT" ] && kill -KILL "${p#/proc/}" 2>/dev/null
    done
    for m in etc/resolv.conf etc/hosts tmp sys dev proc; do mountpoint -q "$ROOT/$m" && umount -l "$ROOT/$m"; done
    podman umount bentowhisper-cpu-check >/dev/null 2>&1
  fi
  podman rm -f bentowhisper-cpu-check >/dev/null 2>&1
  true
}
ROOT=
trap cleanup EXIT
trap "exit 143" TERM INT  # a signal exits, and the exit cleans up
sleep 3

step "bentoml containerize $TAG --backend podman"
if ! podman image exists $IMAGE; then
  start=$(date +%s)
  cat "$HOST_CA_BUNDLE" "$WORK/ca.pem" >"$WORK/ca-bundle.crt"
  "$BENTOML" containerize "$TAG" --backend podman --image-tag $IMAGE \
    --opt isolation=chroot --opt add-host=download.pytorch.org:127.0.0.1 \
    --opt volume="$WORK/ca-bundle.crt:/etc/ssl/certs/ca-certificates.crt:ro" \
    >"$WORK/containerize.log" 2>&1 || { tail -30 "$WORK/containerize.log"; exit 1; }
  echo "built in $(( $(date +%s) - start )) s"
fi
podman image inspect --format 'image {{.Id}} {{.Size}} bytes' $IMAGE
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E 'bentowhisper|python'

step "run the image"
if podman run -d --name bentowhisper-cpu-check --network host -e BENTOML_PORT=$PORT $IMAGE \
  >"$WORK/podman-run.log" 2>&1; then
  echo "podman run: started"
else
  echo "podman run failed: $(tail -3 "$WORK/podman-run.log")"
  podman rm -f bentowhisper-cpu-check >/dev/null 2>&1 || true
  # Fallback: a container's root filesystem (the image plus a writable layer: BentoML writes
  # under /home/bentoml) in a chroot, with the image's user, workdir, env and entrypoint.
  podman create --name bentowhisper-cpu-check $IMAGE >/dev/null
  ROOT=$(podman mount bentowhisper-cpu-check)
  # /etc/hosts and resolv.conf as podman gives a --network host container: the image's are empty
  for m in proc dev sys etc/hosts etc/resolv.conf; do mount --bind /$m "$ROOT/$m"; done
  mount -t tmpfs tmpfs "$ROOT/tmp"
  mapfile -t ENVS < <(podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' $IMAGE | grep .)
  USERSPEC=$(podman image inspect --format '{{.Config.User}}' $IMAGE)
  WORKDIR=$(podman image inspect --format '{{.Config.WorkingDir}}' $IMAGE)
  ENTRY=$(podman image inspect --format '{{index .Config.Entrypoint 0}}' $IMAGE)
  echo "chroot $ROOT as $USERSPEC in $WORKDIR: $ENTRY"
  setsid env -i "${ENVS[@]}" BENTOML_PORT=$PORT HOME=/home/bentoml \
    chroot --userspec="$(chroot "$ROOT" id -u "$USERSPEC"):$(chroot "$ROOT" id -g "$USERSPEC")" "$ROOT" \
    /bin/bash -c "cd '$WORKDIR' && exec '$ENTRY'" >"$WORK/serve.log" 2>&1 &
  SERVER_PID=$!
fi
for _ in $(seq 1 120); do
  curl -sf -m 5 "localhost:$PORT/readyz" >/dev/null && break
  sleep 5
done
curl -sf -m 5 "localhost:$PORT/readyz" >/dev/null || {
  echo "not ready"; tail -30 "$WORK/serve.log" 2>/dev/null; podman logs bentowhisper-cpu-check 2>&1 | tail -30; exit 1; }
echo "ready on :$PORT"

step "transcribe jfk with the openai SDK"
"$PY" - "$PORT" "$JFK" <<'PYEOF'
import sys, time
from openai import OpenAI

client = OpenAI(base_url=f"http://localhost:{sys.argv[1]}/v1", api_key="none")
start = time.perf_counter()
with open(sys.argv[2], "rb") as f:
    result = client.audio.transcriptions.create(model="whisper-1", file=f)
print(f"{time.perf_counter() - start:.1f} s: {result.text}")
assert "ask not what your country can do for you" in result.text.lower(), result.text
PYEOF
step "done"
