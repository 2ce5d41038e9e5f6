#!/usr/bin/env bash
# Runs iamlet on this machine with config/local.toml: a local STS (moto_server) on
# 127.0.0.1:5000 and iamlet's IMDS on 127.0.0.1:8181 (admin port 8182). No AWS account and no
# Kubernetes needed. The README's "Try it" walks through it.
#
# 1. the Python peers (.peers/venv: moto and the AWS CLI), installed on first use;
# 2. cargo build (a few minutes the first time), then
# 3. the STS, checked with a real STS call, and
# 4. iamlet, checked with `iamlet health --ready`.
# Ctrl-C or SIGTERM stops everything it started, iamlet first, and waits for it to end.
# Extra arguments go to `iamlet agent` (e.g. --log-level info).
set -euo pipefail
cd "$(dirname "$0")/../.."

say() { printf 'run.sh: %s\n' "$*" >&2; }

started=()   # what this script started and must stop, in start order
child=""     # a foreground step run in the background, so that signals are handled at once

stop() {
  trap - INT TERM EXIT
  if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null || true; fi
  local i
  for ((i = ${#started[@]} - 1; i >= 0; i--)); do
    kill -TERM "${started[i]}" 2>/dev/null || true
    wait "${started[i]}" 2>/dev/null || true
  done
  wait || true
}
trap 'say "stopping"; stop; exit 130' INT
trap 'say "stopping"; stop; exit 143' TERM
trap 'stop' EXIT

# Runs a step in the background and waits for it: bash runs a trap only once the foreground
# command is done, and a first build takes minutes.
step() {
  "$@" &
  child=$!
  local status=0
  wait "$child" || status=$?
  child=""
  return "$status"
}

# 1. Peers.
venv=.peers/venv
if [ -x "$venv/bin/moto_server" ]; then
  moto=$venv/bin/moto_server
  python=$venv/bin/python
elif command -v moto_server >/dev/null 2>&1; then
  moto=$(command -v moto_server)
  python=python3
else
  say "installing the Python peers (moto, the AWS CLI) into $venv; this happens once"
  step bash .ci/setup venv
  moto=$venv/bin/moto_server
  python=$venv/bin/python
fi

# 2. Build, before anything starts.
say "building iamlet (cargo build; the first build takes a few minutes)"
step cargo build --locked --bin iamlet
iamlet=${CARGO_TARGET_DIR:-target}/debug/iamlet
logs=target/iamlet-local
mkdir -p "$logs"

# 3. The STS. It counts as up only when it answers an STS call (moto checks no signature).
sts_answers() {
  "$python" - <<'PY' 2>/dev/null
import sys, urllib.request
request = urllib.request.Request(
    "http://127.0.0.1:5000/",
    data=b"Action=GetCallerIdentity&Version=2011-06-15",
    headers={
        "Content-Type": "application/x-www-form-urlencoded",
        "Authorization": "AWS4-HMAC-SHA256 Credential=local/20240101/us-east-1/sts/aws4_request, "
        "SignedHeaders=host, Signature=0",
    },
)
try:
    with urllib.request.urlopen(request, timeout=2) as response:
        sys.exit(0 if b"GetCallerIdentityResponse" in response.read() else 1)
except Exception:
    sys.exit(1)
PY
}
port_taken() { (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null; }

if sts_answers; then
  say "an STS already answers on 127.0.0.1:5000; using it"
elif port_taken 5000; then
  say "127.0.0.1:5000 is taken by something that is not an STS; stop it and try again"
  exit 1
else
  say "starting the local STS (moto) on 127.0.0.1:5000, log in $logs/moto.log"
  "$moto" -H 127.0.0.1 -p 5000 >"$logs/moto.log" 2>&1 &
  started+=($!)
  for _ in $(seq 150); do
    sts_answers && break
    if ! kill -0 "${started[0]}" 2>/dev/null; then
      say "moto exited; its log:"
      cat "$logs/moto.log" >&2
      exit 1
    fi
    sleep 0.2
  done
  if ! sts_answers; then
    say "the local STS did not answer within 30 s; its log: $logs/moto.log"
    exit 1
  fi
  say "the local STS answers on 127.0.0.1:5000"
fi

# 4. iamlet. Its own AWS credentials: moto accepts any.
say "starting iamlet with config/local.toml"
AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_EC2_METADATA_DISABLED=true \
  "$iamlet" agent --config config/local.toml "$@" &
iamlet_pid=$!
started+=("$iamlet_pid")
ready=false
for _ in $(seq 150); do
  if "$iamlet" health --ready --config config/local.toml >/dev/null 2>&1; then
    ready=true
    break
  fi
  kill -0 "$iamlet_pid" 2>/dev/null || break
  sleep 0.2
done
if ! $ready; then
  status=0
  wait "$iamlet_pid" || status=$?
  say "iamlet did not become ready (exit status $status); its error is above"
  exit 1
fi

cat >&2 <<'HELP'
run.sh: iamlet is ready: IMDS on 127.0.0.1:8181, admin port on 127.0.0.1:8182.
In another shell, as the pod "demo/shell" (your shell, 127.0.0.1):
  curl -s http://127.0.0.1:8181/latest/meta-data/iam/security-credentials/
and the rest of README.md's "Try it". Ctrl-C here stops iamlet and the STS.
HELP

status=0
wait "$iamlet_pid" || status=$?
say "iamlet exited (status $status)"
exit "$status"
