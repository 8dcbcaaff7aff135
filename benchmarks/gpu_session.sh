#!/usr/bin/env bash
# The one prepared script of a session with a GPU (docs/testing.md, "A session with a GPU"): the device
# tool runs `bash benchmarks/gpu_session.sh` in the repository root with $OUT set, and what lands in $OUT
# comes back. Steps, each under its own `timeout`, about 9 minutes in all (under the tool's 10 per call):
#
#   install  pip install -e . (no index, no deps: the device has no network; torch is the image's)
#   gpu      nvidia-smi -L
#   suite    the CUDA suite, pytest -m cuda       -> $OUT/cuda_suite.txt, $OUT/cuda_suite.xml
#   speed    benchmarks/gpu_speed.py --out $OUT   -> $OUT/gpu_speed_<gpu>.{json,md}, $OUT/gpu_speed.txt
#
# A step that fails or runs out of time is recorded in $OUT/session.txt (exit code 124: its limit) and
# the next step runs all the same; the script exits 1 when any step failed, after all of them.
# gpu_speed.py writes its results after each section, so one stopped at its limit keeps what it measured.
#
# Fashion-MNIST (gpu_speed's epoch section) travels as a carried, git-ignored folder holding its four gz
# files, .gpu-carry/fashion-mnist by default (GPU_SESSION_FMNIST=DIR for another); without it that
# section is skipped and says why. It is also linked at the default root, /usr/share/datasets/fashion-mnist,
# where that is free, so code reading the default finds it as on the project's machines.
#
# GPU_SESSION_DRY=1 prints the commands instead of running them and writes nothing
# (tests/test_gpu_session_script.py); GPU_SESSION_TESTS=PATHS narrows what the suite step collects
# (default: tests, as `make test-gpu`). Limits in seconds: GPU_SESSION_INSTALL_S, GPU_SESSION_SUITE_S,
# GPU_SESSION_SPEED_S, and GPU_SESSION_BUDGET_S (gpu_speed.py --budget-s: its last section gets what is
# left of it, so it stays under the speed limit with room to write its files).
set -u
cd "$(dirname "$0")/.." || exit 2

if [ -z "${OUT:-}" ]; then
    echo "gpu_session: OUT is not set (the device tool sets it: the folder whose files come back)" >&2
    exit 2
fi
DRY="${GPU_SESSION_DRY:-0}"
PY="${PYTHON:-python3}"
FMNIST="${GPU_SESSION_FMNIST:-.gpu-carry/fashion-mnist}"
FMNIST_DEFAULT=/usr/share/datasets/fashion-mnist
INSTALL_S="${GPU_SESSION_INSTALL_S:-45}"
GPU_S=15
SUITE_S="${GPU_SESSION_SUITE_S:-225}"
SPEED_S="${GPU_SESSION_SPEED_S:-255}"
BUDGET_S="${GPU_SESSION_BUDGET_S:-$((SPEED_S - 30))}"
TESTS="${GPU_SESSION_TESTS:-tests}"  # what pytest collects before -m cuda selects
SESSION="$OUT/session.txt"
# this checkout's package wherever pip puts the editable install; Python's output as it happens
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
failed=0

note() {  # a line of the session record (printed only, in a dry run)
    if [ "$DRY" = 1 ]; then echo "# $*"; else echo "$*" | tee -a "$SESSION"; fi
}

# step NAME LIMIT LOG COMMAND...: run COMMAND under `timeout LIMIT`, its output appended to LOG (and shown),
# and record its exit code and duration.
step() {
    local name="$1" limit="$2" log="$3"
    shift 3
    if [ "$DRY" = 1 ]; then
        echo "+ [$name] timeout -k 10 $limit $* >> $log"
        return 0
    fi
    local start=$SECONDS rc
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || failed=1
    note "step $name: exit $rc after $((SECONDS - start)) s (limit $limit s): $*"
}

[ "$DRY" = 1 ] || mkdir -p "$OUT" || exit 2
note "gpu session $(date -u +%Y-%m-%dT%H:%M:%SZ) in $PWD, $($PY --version 2>&1)"

step install "$INSTALL_S" "$SESSION" "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
step gpu "$GPU_S" "$SESSION" nvidia-smi -L

speed_data=()
if [ -f "$FMNIST/train-images-idx3-ubyte.gz" ] && [ -f "$FMNIST/train-labels-idx1-ubyte.gz" ] \
        && [ -f "$FMNIST/t10k-images-idx3-ubyte.gz" ] && [ -f "$FMNIST/t10k-labels-idx1-ubyte.gz" ]; then
    speed_data=(--data-root "$FMNIST")
    if [ ! -e "$FMNIST_DEFAULT" ] && [ "$DRY" != 1 ]; then
        mkdir -p "$(dirname "$FMNIST_DEFAULT")" 2>/dev/null && ln -s "$PWD/$FMNIST" "$FMNIST_DEFAULT" 2>/dev/null \
            && note "fashion-mnist: $FMNIST, linked at $FMNIST_DEFAULT"
    fi
    note "fashion-mnist: $FMNIST"
else
    note "fashion-mnist: not carried ($FMNIST lacks the four gz files): gpu_speed's epoch section is skipped"
fi

# Every test marked `cuda` (all of tests/gpu, tests/conftest.py), one test at most 150 s where
# pytest-timeout is installed; a module that fails to import does not stop the rest.
per_test=()
if [ "$DRY" != 1 ] && "$PY" -c "import pytest_timeout" 2>/dev/null; then
    per_test=(--timeout 150)
fi
step suite "$SUITE_S" "$OUT/cuda_suite.txt" "$PY" -m pytest -q -rs -m cuda -p no:cacheprovider \
    --continue-on-collection-errors --durations 25 --junitxml "$OUT/cuda_suite.xml" ${per_test[@]+"${per_test[@]}"} $TESTS

step speed "$SPEED_S" "$OUT/gpu_speed.txt" "$PY" benchmarks/gpu_speed.py --out "$OUT" --budget-s "$BUDGET_S" \
    ${speed_data[@]+"${speed_data[@]}"}

if [ "$DRY" != 1 ]; then
    note "files in $OUT (commit results files under benchmarks/results/):"
    (cd "$OUT" && ls -l) | tee -a "$SESSION"
fi
exit "$failed"
