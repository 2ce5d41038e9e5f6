#!/usr/bin/env bash
# Runs iamlet on this machine with config/local.toml: a local STS (moto_server from the test
# peers in .peers/, or one on PATH) on 127.0.0.1:5000, and iamlet's IMDS on 127.0.0.1:8181.
# No AWS account and no Kubernetes needed. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/../.."

moto=.peers/venv/bin/moto_server
[ -x "$moto" ] || moto=$(command -v moto_server || true)
if [ -z "$moto" ]; then
  bash .ci/setup
  moto=.peers/venv/bin/moto_server
fi

if ! (exec 3<>/dev/tcp/127.0.0.1/5000) 2>/dev/null; then
  "$moto" -H 127.0.0.1 -p 5000 >target/moto-local.log 2>&1 &
  moto_pid=$!
  trap 'kill $moto_pid 2>/dev/null' EXIT
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/5000) 2>/dev/null && break; sleep 0.2; done
  echo "local STS (moto) on 127.0.0.1:5000, log in target/moto-local.log"
fi

cat <<'HELP'
iamlet on 127.0.0.1:8181. In another shell, as the pod "demo/shell" (127.0.0.1):
  curl -s http://127.0.0.1:8181/latest/meta-data/iam/security-credentials/
  AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:8181 AWS_ACCESS_KEY_ID= AWS_SECRET_ACCESS_KEY= \
    aws sts get-caller-identity --endpoint-url http://127.0.0.1:5000 --region us-east-1
As "demo/web-0" (127.0.0.2):
  curl -s --interface 127.0.0.2 http://127.0.0.1:8181/latest/meta-data/iam/security-credentials/demo-web
HELP

# iamlet's own AWS credentials: moto accepts any.
export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local
mkdir -p target
exec cargo run --quiet -- agent --config config/local.toml "$@"
