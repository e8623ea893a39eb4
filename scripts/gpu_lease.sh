#!/usr/bin/env bash
# The prepared command for a short session on the GPU machine (a fixed time budget of about 15
# minutes, the machine's start included; one command at most 10 minutes; few files come back).
#
#   CNNKERN_GIT_COMMIT=<commit> scripts/gpu_lease.sh ARCHIVE.tgz
#
# runs scripts/gpu_validate.sh under a deadline, most valuable first: the build, the host time per
# warm call of every op beside PyTorch's (bench-host: calibrates the instruction counts CI gates),
# a conv call's host vs kernel time, eager and in a CUDA graph, against cuDNN (overhead), the CUDA
# C++ convolution's tests, the quick benchmark against cuDNN, the same conv layers on the mma.sync
# kernel, then the GPU tests for whatever time is left; and packs every log, junit XML and
# benchmark JSON into ARCHIVE.tgz. Each step has a cap so that one slow step cannot take the
# others' time; a step that runs out is stopped (pytest writes its results first; the bench
# stops itself and writes what it measured). The device tree has no .git: pass the commit.
#
# Environment (defaults for one 10-minute command): DEADLINE_S (540), STEPS (below), and
# everything scripts/gpu_validate.sh reads.
set -uo pipefail
if [ $# -ne 1 ]; then
  echo "usage: CNNKERN_GIT_COMMIT=<commit> $0 ARCHIVE.tgz" >&2
  exit 2
fi
case "$1" in
  /*) archive="$1" ;;
  *) archive="$PWD/$1" ;;
esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -n "${CNNKERN_GIT_COMMIT:-}" ] || echo "warning: CNNKERN_GIT_COMMIT is unset: results will say commit 'unknown'" >&2
export DEADLINE_S="${DEADLINE_S:-540}"
export STEPS="${STEPS:-bench-host:60 overhead:90 pytest-cuda-conv:120 bench-quick:150 bench-mma:60 pytest-gpu}"
export PACK="$archive"
out="$(mktemp -d /tmp/cnnkern-gpu.XXXXXX)/gpu_validate"
exec "$root/scripts/gpu_validate.sh" "$out"
