#!/usr/bin/env bash
# usage: scripts/readme-quickstart.sh [README]
# Runs the README's quick start as a new user would: every ```sh block between
# `<!-- quickstart:begin -->` and `<!-- quickstart:end -->`, in order, as one bash script
# (`set -euo pipefail`: the first failing command fails the run), from the repository
# root, where the README says its commands run (`./target/release/vireo`, docs/examples).
# The extracted script and its log go to a fresh temporary directory. The run is bounded
# by VIREO_QUICKSTART_TIMEOUT seconds (default 1800: it includes `cargo build
# --release`); every process it started, background daemons included, is killed at the
# end. It fails too if the commands changed a tracked file of the repository.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
README=$(realpath "${1:-$ROOT/README.md}")
LIMIT=${VIREO_QUICKSTART_TIMEOUT:-1800}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vireo-quickstart.XXXXXX")
SCRIPT=$WORK/quickstart.sh
GROUP=""

cleanup() {
  local rc=$?
  # The run is a process group of its own (timeout's): end whatever is left of it.
  if [ -n "$GROUP" ] && kill -0 -- "-$GROUP" 2>/dev/null; then
    kill -TERM -- "-$GROUP" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      kill -0 -- "-$GROUP" 2>/dev/null || break
      sleep 0.2
    done
    kill -KILL -- "-$GROUP" 2>/dev/null || true
  fi
  if [ "$rc" -eq 0 ]; then
    rm -rf "$WORK"
  else
    echo "readme-quickstart: FAILED (exit $rc); script and log kept in $WORK" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The marked ```sh blocks, verbatim; anything else between the markers is prose.
awk '
  /<!-- quickstart:begin -->/ { if (marked) { print "nested quickstart:begin at line " NR > "/dev/stderr"; exit 2 } marked = 1; next }
  /<!-- quickstart:end -->/   { if (!marked || code) { print "stray quickstart:end at line " NR > "/dev/stderr"; exit 2 } marked = 0; next }
  marked && !code && /^```sh[[:space:]]*$/ { code = 1; blocks++; printf "\n: README block %d, line %d\n", blocks, NR + 1; next }
  code && /^```[[:space:]]*$/ { code = 0; next }
  code { print }
  END {
    if (marked || code) { print "unterminated quickstart block" > "/dev/stderr"; exit 2 }
    if (!blocks) { print "no quickstart blocks" > "/dev/stderr"; exit 2 }
  }
' "$README" > "$WORK/blocks.sh"
{
  echo 'set -euo pipefail'
  echo "PS4='+ README: '"
  echo 'set -x'
  cat "$WORK/blocks.sh"
} > "$SCRIPT"
echo "readme-quickstart: $(grep -c '^: README block' "$SCRIPT") blocks of $README, from $ROOT (limit ${LIMIT} s)" >&2

cd "$ROOT"
tracked() { # the state of the tracked files, when this is a git checkout
  if git rev-parse --git-dir >/dev/null 2>&1; then git status --porcelain --untracked-files=no; fi
}
before=$(tracked)
start=$(date +%s)
# timeout puts itself and the script in a new process group: $GROUP names it.
timeout --kill-after=10 "$LIMIT" bash "$SCRIPT" < /dev/null > >(tee "$WORK/log") 2>&1 &
GROUP=$!
rc=0
wait "$GROUP" || rc=$?
took=$(( $(date +%s) - start ))
if [ "$rc" -ne 0 ]; then
  [ "$rc" -eq 124 ] && echo "readme-quickstart: timed out after ${LIMIT} s" >&2
  echo "readme-quickstart: a README command failed (exit $rc) after ${took} s" >&2
  exit "$rc"
fi
after=$(tracked)
if [ "$before" != "$after" ]; then
  echo "readme-quickstart: the README's commands changed tracked files:" >&2
  diff <(echo "$before") <(echo "$after") >&2 || true
  exit 1
fi
echo "readme-quickstart: passed in ${took} s" >&2
