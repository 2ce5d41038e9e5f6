#!/usr/bin/env bash
# Runs one fuzz target for a bounded time on the pinned stable toolchain:
#   bash fuzz/run.sh TARGET SECONDS      (TARGET: route, token, role_arn, namespace_policy, jwt,
#                                          or all; SECONDS=0 only replays and prunes the corpus)
# libFuzzer (from the libfuzzer-sys crate) drives the target; coverage comes from rustc's
# stable -C passes=sancov-module instrumentation, so neither nightly nor cargo-fuzz is needed.
# New inputs that add coverage are merged into fuzz/corpus/TARGET, kept small (below); a crash
# is saved as fuzz/artifacts/TARGET/crash-*, and the script fails: once fixed, copy it into
# fuzz/corpus/TARGET/ under its crash-* name, where the normal test suite replays it.
# The kept corpus is replayed by `cargo test --test fuzz_corpus` in the normal suite.
set -euo pipefail
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$self")"
target=${1:?usage: fuzz/run.sh TARGET SECONDS}
seconds=${2:?usage: fuzz/run.sh TARGET SECONDS}
if [ "$target" = all ]; then
  for t in route token role_arn namespace_policy jwt; do bash "$self" "$t" "$seconds"; done
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
# SECONDS=0 only replays and re-prunes the corpus.
budget=(-max_total_time="$seconds")
[ "$seconds" = 0 ] && budget=(-runs=0)
"$binary" "$work" "$kept" "${budget[@]}" -max_len=4096 -timeout=10 \
  -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="artifacts/$target/" || status=$?
# The repository keeps a small corpus: the hand-written seeds and fixed crashes (seed-*,
# crash-*), plus at most $max_kept inputs (the smallest) of a set-cover merge of everything
# found. The whole corpus stays in $work for the next run.
max_kept=100
merged=$(mktemp -d)
trap 'rm -rf "$merged"' EXIT
"$binary" -set_cover_merge=1 "$merged" "$kept" "$work" -max_len=4096 >/dev/null 2>&1 || true
cp -n "$kept"/* "$work"/ 2>/dev/null || true
find "$kept" -type f ! -name 'seed-*' ! -name 'crash-*' -delete
(cd "$merged" && ls -S -r | sed -n "1,${max_kept}p") | while read -r input; do cp "$merged/$input" "$kept/"; done
echo "fuzz: $target ran ${seconds}s; kept corpus: $(ls "$kept" | wc -l) inputs; exit $status"
exit "$status"
