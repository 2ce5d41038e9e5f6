#!/usr/bin/env bash
# Runs one fuzz target for a bounded time on the pinned stable toolchain:
#   bash fuzz/run.sh TARGET SECONDS      (TARGET: route, token, role_arn, namespace_policy, jwt, or all)
# libFuzzer (from the libfuzzer-sys crate) drives the target; coverage comes from rustc's
# stable -C passes=sancov-module instrumentation, so neither nightly nor cargo-fuzz is needed.
# New inputs that add coverage are merged into fuzz/corpus/TARGET (kept small: at most 4 KiB
# each); a crash is saved as fuzz/artifacts/TARGET/crash-*, and the script fails.
# The kept corpus is replayed by `cargo test --test fuzz_corpus` in the normal suite.
set -euo pipefail
cd "$(dirname "$0")"
target=${1:?usage: fuzz/run.sh TARGET SECONDS}
seconds=${2:?usage: fuzz/run.sh TARGET SECONDS}
if [ "$target" = all ]; then
  for t in route token role_arn namespace_policy jwt; do bash "$0" "$t" "$seconds"; done
  exit 0
fi
triple=$(rustc -vV | sed -n 's/^host: //p')
# --target keeps the instrumentation out of build scripts and proc macros.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
  -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-../target/fuzz}
# Start from the main lock file, so the fuzz build uses the versions the project tested.
[ -f Cargo.lock ] || cp ../Cargo.lock Cargo.lock
cargo build --release --target "$triple" --bin "$target"
binary="$CARGO_TARGET_DIR/$triple/release/$target"
kept="corpus/$target"
work="$CARGO_TARGET_DIR/corpus/$target"
mkdir -p "$kept" "$work" "artifacts/$target"
status=0
"$binary" "$work" "$kept" -max_total_time="$seconds" -max_len=4096 -timeout=10 \
  -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="artifacts/$target/" || status=$?
# Keep only inputs that add coverage to what is kept already.
"$binary" -merge=1 "$kept" "$work" -max_len=4096 >/dev/null 2>&1 || true
echo "fuzz: $target ran ${seconds}s; kept corpus: $(ls "$kept" | wc -l) inputs; exit $status"
exit "$status"
