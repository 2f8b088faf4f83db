#!/usr/bin/env bash
# gpu_check.sh: build, test and benchmark fastblocks on a borrowed CUDA machine (issue #10).
#
# Made for the device tool: an H200 for ~15 minutes in all (start-up included), no network,
# at most 10 minutes per command, an empty $OUT folder whose contents come back. Every stage
# writes OUTDIR/<stage>.log and one row of OUTDIR/summary.txt (rc, seconds, a one-line result);
# a failing stage never stops the later ones. Benchmark results go to OUTDIR/results/; the
# lead copies them into benchmarks/results/<device-slug>/ afterwards (and runs
# benchmarks/update_readme.py).
#
#   bash benchmarks/gpu_check.sh OUTDIR [STAGE...]     (default: all, in the order below)
#
# From the device tool, e.g. two commands of timeout_s=600 each:
#   bash benchmarks/gpu_check.sh "$OUT" env build test
#   bash benchmarks/gpu_check.sh "$OUT" bench-ops bench-models
# A later command on the same (still warm) machine reuses the venv and the build; on a fresh
# machine a stage that needs the package runs `build` first by itself.
#
# Stages:
#   env           nvidia-smi, python/torch/triton/nvcc versions, device properties -> OUTDIR/env.txt
#   build         venv (--system-site-packages) + pip install --no-build-isolation --no-deps -e .
#                 (FASTBLOCKS_CUDA_ARCHS=9.0, MAX_JOBS=16), then `fastblocks info` must show the
#                 CUDA extension and Triton on cuda; if the CUDA build fails, the CPU-only
#                 extension is built instead (the stage still fails) so the Triton paths can run
#   test          pytest -m "not slow" on the GPU, real Triton, FASTBLOCKS_REQUIRE_BACKENDS=cuda,triton,cpu
#   bench-ops     fastblocks bench --ops (eager,fused both layouts; then the compile providers, channels_last)
#   bench-models  fastblocks bench --models resnet50,densenet201 (non-compile providers; then
#                 fastblocks memory densenet201; then the compile providers per model)
#   pytest-bench  pytest benchmarks --benchmark-only --benchmark-json OUTDIR/pytest-benchmark.json
#   test-slow     pytest -m slow (last: its tests mostly exercise the CPU)
#
# Environment (all optional):
#   GPU_CHECK_BUDGET_S=560      seconds this invocation may use (set it to the device command's
#                               timeout_s minus ~30); every step's timeout is clamped to what is
#                               left, and a stage with under a minute left is skipped
#   GPU_CHECK_TIMEOUT_<STAGE>   per-stage limit in seconds (e.g. GPU_CHECK_TIMEOUT_TEST=540; default 540)
#   GPU_CHECK_PYTHON=python3    the system Python with the CUDA torch
#   GPU_CHECK_VENV=build/gpu-venv
#   GPU_CHECK_FRESH_VENV=1      recreate the venv
#   GPU_CHECK_WHEELHOUSE=build/wheelhouse  wheels of pytest/pytest-benchmark (and their deps) to
#                               install offline when the system lacks them; made on a machine
#                               with network: pip download --only-binary=:all: -d build/wheelhouse
#                               pytest pytest-benchmark  (then `carry` build/wheelhouse)
#   GPU_CHECK_BENCH_SPLIT=0     run each bench stage as one `fastblocks bench` command (default 1:
#                               split into parts that each write their results, so a timeout
#                               loses only the part it cut)
#   GPU_CHECK_DRY_RUN=1         print the commands instead of running them
#   MAX_JOBS=16, FASTBLOCKS_CUDA_ARCHS=9.0

# The stage functions are called as "stage_$name", which shellcheck cannot follow.
# shellcheck disable=SC2317
set -u
set -o pipefail

STAGES_ALL=(env build test bench-ops bench-models pytest-bench test-slow)

usage() {
    echo "usage: bash benchmarks/gpu_check.sh OUTDIR [STAGE...]   stages: ${STAGES_ALL[*]} (or all)" >&2
}

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    usage
    exit 2
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
shift
STAGES=()
for s in "${@:-all}"; do
    if [[ $s == all ]]; then
        STAGES+=("${STAGES_ALL[@]}")
    elif [[ " ${STAGES_ALL[*]} " == *" $s "* ]]; then
        STAGES+=("$s")
    else
        echo "gpu_check: unknown stage '$s'" >&2
        usage
        exit 2
    fi
done

DRY=${GPU_CHECK_DRY_RUN:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-560}
SYS_PY=${GPU_CHECK_PYTHON:-python3}
VENV=${GPU_CHECK_VENV:-$REPO/build/gpu-venv}
[[ $VENV == /* ]] || VENV=$REPO/$VENV
VPY=$VENV/bin/python
WHEELHOUSE=${GPU_CHECK_WHEELHOUSE:-$REPO/build/wheelhouse}
[[ $WHEELHOUSE == /* ]] || WHEELHOUSE=$REPO/$WHEELHOUSE
SPLIT=${GPU_CHECK_BENCH_SPLIT:-1}
JOBS=${MAX_JOBS:-16}
ARCHS=${FASTBLOCKS_CUDA_ARCHS:-9.0}
STAMP=$VENV/.gpu-check-installed
RESULTS=$OUT/results
MIN_STAGE_S=60 # a stage with less time left than this is skipped
MIN_STEP_S=20  # likewise for a step inside a stage
T0=$SECONDS
BUILD_TRIED=0

# Every Python command runs with real Triton (no interpreter) and the automatic backend choice.
PYENV=(env -u TRITON_INTERPRET -u FASTBLOCKS_BACKEND PYTHONUNBUFFERED=1)

cd "$REPO" || exit 2
mkdir -p "$RESULTS"
TMPD=$(mktemp -d)
trap 'rm -rf "$TMPD"' EXIT

dry() { [[ $DRY == 1 ]]; }
# The command line as one would type it (single quotes only where needed).
shell_words() {
    local w out=()
    for w in "$@"; do
        if [[ $w =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then
            out+=("$w")
        elif [[ $w != *\'* ]]; then
            out+=("'$w'")
        else
            out+=("$(printf '%q' "$w")")
        fi
    done
    printf '%s' "${out[*]}"
}
left_s() { echo $((BUDGET - (SECONDS - T0))); }
log() { printf '%s\n' "$*" >>"$STAGE_LOG"; }
say() { printf '[gpu_check] %s\n' "$*"; }

# The timeout for the next step: what is left of the stage's limit and of the budget.
step_limit() {
    local s=$((STAGE_LIMIT - (SECONDS - STAGE_T0))) b=$(($(left_s) - 10))
    echo $((s < b ? s : b))
}

# run_step TIMEOUT CMD...: run CMD with its output appended to the stage log; TIMEOUT 0 = none.
# On timeout pytest gets SIGINT first (it still writes its junit xml, durations and summary),
# then SIGKILL 30 s later. Returns CMD's rc (124: timed out).
run_step() {
    local t=$1 rc start
    shift
    printf '\n+ %s\n' "$(shell_words "$@")" >>"$STAGE_LOG"
    if dry; then
        printf '[dry-run] %s\n' "$(shell_words "$@")"
        return 0
    fi
    if [[ $t -gt 0 && $t -lt $MIN_STEP_S ]]; then
        log "[skipped: only ${t}s left]"
        return 124
    fi
    start=$SECONDS
    if [[ $t -gt 0 ]]; then
        timeout -s INT -k 30 "$t" "$@" >>"$STAGE_LOG" 2>&1
    else
        "$@" >>"$STAGE_LOG" 2>&1
    fi
    rc=$?
    log "[rc=$rc after $((SECONDS - start)) s$([[ $rc == 124 ]] && echo ", timed out at ${t}s")]"
    return "$rc"
}

# probe CMD...: a quick check whose output goes to the log; in a dry run it counts as passed.
probe() { run_step 120 "$@"; }

# ------------------------------------------------------------------ summary.txt
declare -A ROW_RC ROW_S ROW_NOTE
ROWS=()
PREVIOUS=""
[[ -s $OUT/summary.txt ]] && PREVIOUS=$(cat "$OUT/summary.txt")
COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
HOST=${HOSTNAME:-$(uname -n)}
HEADER="# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) host=$HOST commit=$COMMIT stages=${STAGES[*]} budget=${BUDGET}s dry_run=$DRY"

set_row() { # name rc seconds note
    [[ -n ${ROW_RC[$1]+x} ]] || ROWS+=("$1")
    ROW_RC[$1]=$2
    ROW_S[$1]=$3
    ROW_NOTE[$1]=$4
}

write_summary() {
    {
        [[ -n $PREVIOUS ]] && printf '%s\n\n' "$PREVIOUS"
        echo "$HEADER"
        printf '%-14s %-8s %7s  %s\n' stage rc seconds result
        local r
        for r in "${ROWS[@]}"; do
            printf '%-14s %-8s %7s  %s\n' "$r" "${ROW_RC[$r]}" "${ROW_S[$r]}" "${ROW_NOTE[$r]}"
        done
    } >"$OUT/summary.txt"
}

# The last pytest summary line of the stage log ("3 failed, 850 passed, 12 skipped in 301.2s").
pytest_result() {
    grep -E '([0-9]+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed))|no tests ran' "$STAGE_LOG" |
        grep -E ' in [0-9.]+s' | tail -n 1 | sed -E 's/^=+ //; s/ =+$//'
}

# ------------------------------------------------------------------ helper scripts
cat >"$TMPD/env_probe.py" <<'EOF'
import importlib.metadata as md
import os
import sys

print("python", sys.version.split()[0], sys.executable)
for pkg in ("torch", "triton", "setuptools", "pip", "wheel", "ninja", "pybind11", "numpy", "tqdm",
            "matplotlib", "pytest", "pytest-benchmark", "scikit-learn"):
    try:
        v = md.version(pkg)
    except md.PackageNotFoundError:
        v = "MISSING"
    print(f"  {pkg:<18} {v}")
for k in sorted(os.environ):
    if k.startswith(("FASTBLOCKS_", "TRITON_", "TORCH_", "CUDA_", "NVIDIA_")) or k in ("MAX_JOBS", "CC", "CXX"):
        print(f"  env {k}={os.environ[k]}")
try:
    import torch
except Exception as exc:
    print("torch: import FAILED:", exc)
    sys.exit(1)
from torch.utils import cpp_extension

print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("torch arch list", torch.cuda.get_arch_list() if torch.version.cuda else None)
print("cpp_extension.CUDA_HOME", cpp_extension.CUDA_HOME, "ninja available:", cpp_extension.is_ninja_available())
ok = torch.cuda.is_available()
print("cuda available", ok, "device count", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"device {i}: {p}")
    for a in ("name", "major", "minor", "total_memory", "multi_processor_count", "L2_cache_size",
              "max_threads_per_multi_processor", "warp_size"):
        print(f"  {a:<32} {getattr(p, a, '?')}")
if ok:
    print("bf16 supported", torch.cuda.is_bf16_supported())
try:
    import triton

    print("triton", triton.__version__, triton.__file__)
except Exception as exc:
    print("triton: import FAILED:", exc)
    ok = False
sys.exit(0 if ok else 1)
EOF

cat >"$TMPD/check_info.py" <<'EOF'
"""Is the installed fastblocks ready for the GPU: CUDA extension loaded, Triton on cuda?"""
import json
import sys

from fastblocks import info

data = info.collect()
env = data["environment"]
with open(sys.argv[1], "w") as f:
    json.dump(data, f, indent=2)
problems = []
if env["cuda_device"] is None:
    problems.append("no CUDA device visible to torch")
if env["triton"] is None:
    problems.append("triton not installed")
if env["triton_interpreter"]:
    problems.append("TRITON_INTERPRET is on")
if env["extension"] != "loaded":
    problems.append(f"extension {env['extension']}")
elif not env["extension_cuda"]:
    problems.append("extension built without CUDA")
triton_ops, cuda_ops = [], []
for op, per_dev in data["ops"].items():
    entry = per_dev.get("cuda")
    if entry is None:
        continue
    avail = [b for b, why in entry["backends"].items() if why is None]
    print(f"  {op:<24} cuda: uses {entry['selected']:<10} available: {', '.join(avail)}")
    if "triton" in avail:
        triton_ops.append(op)
    if "cuda" in avail:
        cuda_ops.append(op)
if env["cuda_device"] is not None:
    if not triton_ops:
        problems.append("no op can use triton on cuda")
    if not cuda_ops:
        problems.append("no op can use the cuda backend")
summary = (f"{env['cuda_device']}, torch {env['torch']} (CUDA {env['torch_cuda']}), triton {env['triton']}, "
           f"ext cuda={env['extension_cuda']} isa={env['extension_cpu_isa']}, "
           f"triton ops {len(triton_ops)}, cuda ops {len(cuda_ops)}")
print("info check:", "OK" if not problems else "FAILED: " + "; ".join(problems), "|", summary)
sys.exit(1 if problems else 0)
EOF

# ------------------------------------------------------------------ stages
# Each stage function returns its rc and sets STAGE_NOTE (the one-line result).

stage_env() {
    local txt=$OUT/env.txt rc=0 missing=()
    {
        echo "# gpu_check env $(date -u +%Y-%m-%dT%H:%M:%SZ) host=$HOST"
        echo "repo $REPO commit $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
        git -C "$REPO" --no-optional-locks status --short 2>/dev/null | head -n 40 | sed 's/^/  /'
        echo "uname $(uname -a)"
        echo "nproc $(nproc)"
        free -g 2>/dev/null | head -n 2
        df -h "$REPO" "$OUT" 2>/dev/null
    } >"$txt"
    # The probes' output goes to env.txt; env.log keeps only the stage's own lines.
    local log_save=$STAGE_LOG
    STAGE_LOG=$txt
    run_step 60 nvidia-smi || missing+=(nvidia-smi)
    run_step 60 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit,persistence_mode,mig.mode.current --format=csv || true
    run_step 60 nvidia-smi topo -m || true
    run_step 60 bash -c "command -v $SYS_PY python3 python nvcc gcc g++ ninja; $SYS_PY -m pip --version"
    run_step 120 "${PYENV[@]}" "$SYS_PY" "$TMPD/env_probe.py" || missing+=("torch-cuda/triton")
    run_step 60 nvcc --version || missing+=(nvcc)
    run_step 60 bash -c 'gcc --version | head -n 1; g++ --version | head -n 1; ninja --version'
    STAGE_LOG=$log_save
    dry && return 0
    [[ ${#missing[@]} -gt 0 ]] && rc=1
    local gpu tv
    gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
    tv=$(grep -E '^torch [0-9]' "$txt" | head -n 1)
    STAGE_NOTE="${gpu:-no nvidia-smi}; ${tv:-torch: see env.txt}; $(grep -E '^triton [0-9]' "$txt" | head -n 1 | cut -d' ' -f1-2); nvcc $(grep -oE 'release [0-9.]+' "$txt" | head -n 1 | cut -d' ' -f2)"
    [[ ${#missing[@]} -gt 0 ]] && STAGE_NOTE="MISSING: ${missing[*]}; $STAGE_NOTE"
    log "$STAGE_NOTE"
    return "$rc"
}

# Offline install of pytest / pytest-benchmark from a carried wheelhouse, when missing.
ensure_test_tools() {
    local want=()
    if dry; then
        return 0
    fi
    "$VPY" -c 'import pytest' 2>/dev/null || want+=(pytest)
    "$VPY" -c 'import pytest_benchmark' 2>/dev/null || want+=(pytest-benchmark)
    [[ ${#want[@]} -eq 0 ]] && return 0
    if [[ -d $WHEELHOUSE ]]; then
        log "installing ${want[*]} from $WHEELHOUSE (offline)"
        run_step "$(step_limit)" "$VPY" -m pip install --no-index --find-links "$WHEELHOUSE" "${want[@]}"
        want=()
        "$VPY" -c 'import pytest' 2>/dev/null || want+=(pytest)
        "$VPY" -c 'import pytest_benchmark' 2>/dev/null || want+=(pytest-benchmark)
    fi
    if [[ ${#want[@]} -gt 0 ]]; then
        log "MISSING: ${want[*]} (not installed system-wide; no network to pip-install them; carry a wheelhouse: see the header of benchmarks/gpu_check.sh)"
        MISSING_TOOLS="${want[*]}"
    fi
}

stage_build() {
    BUILD_TRIED=1
    MISSING_TOOLS=""
    local rc=0 pip_rc t_build fallback="" pre n
    if [[ ${GPU_CHECK_FRESH_VENV:-0} == 1 && -d $VENV ]]; then
        run_step 60 rm -rf "$VENV"
    fi
    if dry || [[ ! -x $VPY ]]; then
        if ! run_step 120 "$SYS_PY" -m venv --system-site-packages "$VENV"; then
            # No ensurepip (e.g. Debian without python3-venv): the system pip, seen through
            # the system site-packages, installs into the venv just as well.
            run_step 60 rm -rf "$VENV"
            run_step 120 "$SYS_PY" -m venv --system-site-packages --without-pip "$VENV" || {
                STAGE_NOTE="cannot create a venv with $SYS_PY"
                return 1
            }
        fi
    else
        log "reusing $VENV"
    fi
    # Preflight: what the build and the tests need, all from the system site-packages.
    probe "${PYENV[@]}" "$VPY" "$TMPD/env_probe.py"
    if ! dry; then
        pre=$(
            "$VPY" - <<'EOF' 2>&1
import importlib.util as u
miss = [m for m in ("torch", "triton", "setuptools", "pip", "ninja", "pytest", "pytest_benchmark") if u.find_spec(m) is None]
import torch
from torch.utils import cpp_extension as ce
print(f"torch {torch.__version__} cuda={torch.version.cuda} gpu={torch.cuda.is_available()} "
      f"CUDA_HOME={ce.CUDA_HOME} ninja={ce.is_ninja_available()} missing=[{' '.join(miss)}]")
EOF
        )
        log "preflight: $pre"
        say "build preflight: $(tail -n 1 <<<"$pre")"
    fi
    ensure_test_tools
    local t0=$SECONDS
    n=$(wc -l <"$STAGE_LOG")
    run_step "$(step_limit)" env MAX_JOBS="$JOBS" FASTBLOCKS_CUDA_ARCHS="$ARCHS" "$VPY" -m pip install \
        --no-build-isolation --no-deps --no-index --disable-pip-version-check -v -e .
    pip_rc=$?
    rc=$pip_rc
    t_build=$((SECONDS - t0))
    if [[ $pip_rc -ne 0 ]] && ! dry; then
        # The compiler's first complaints, for the summary and the device tool's output tail.
        tail -n +$((n + 1)) "$STAGE_LOG" | grep -E 'error|Error|fatal' | grep -v -- '-Werror' | head -n 30 >"$OUT/build-errors.txt"
        say "build: pip install failed (rc=$pip_rc); first errors (build-errors.txt):"
        head -n 12 "$OUT/build-errors.txt" | cut -c1-300 | sed 's/^/    ! /'
        NO_TAIL=1
    fi
    if [[ $pip_rc -ne 0 && ${GPU_CHECK_BUILD_FALLBACK:-1} == 1 ]] && ! dry; then
        log "CUDA build failed (rc=$pip_rc); building the CPU-only extension so the Triton paths can still be checked"
        if run_step "$(step_limit)" env MAX_JOBS="$JOBS" FASTBLOCKS_SKIP_CUDA_BUILD=1 "$VPY" -m pip install \
            --no-build-isolation --no-deps --no-index --disable-pip-version-check -v -e .; then
            fallback="; FELL BACK to the CPU-only extension (errors: build-errors.txt)"
        else
            fallback="; the CPU-only fallback failed too"
        fi
    fi
    if ! dry; then
        if [[ $rc -eq 0 ]]; then
            echo cuda >"$STAMP"
        elif [[ $fallback == *FELL* ]]; then
            echo cpu-only >"$STAMP" # later invocations do not retry the failing build by themselves
        fi
    fi
    n=$(wc -l <"$STAGE_LOG")
    run_step 120 "${PYENV[@]}" "$VPY" -m fastblocks info
    dry || tail -n +$((n + 3)) "$STAGE_LOG" | sed '$d' >"$OUT/info.txt"
    run_step 120 "${PYENV[@]}" "$VPY" "$TMPD/check_info.py" "$OUT/info.json" || { [[ $rc -eq 0 ]] && rc=1; }
    dry && return 0
    STAGE_NOTE="pip install rc=$pip_rc in ${t_build}s (archs $ARCHS, MAX_JOBS=$JOBS)$fallback; $(grep -E '^info check:' "$STAGE_LOG" | tail -n 1)"
    [[ -n $MISSING_TOOLS ]] && STAGE_NOTE="$STAGE_NOTE; MISSING (no network): $MISSING_TOOLS"
    return "$rc"
}

# Does STAGE need a build first? Yes on a machine with no install yet (a fresh machine),
# unless the build already ran (and failed) in this invocation: then the stage reports.
needs_build() {
    case $1 in
    test | test-slow | bench-ops | bench-models | pytest-bench) ;;
    *) return 1 ;;
    esac
    ! dry && [[ $BUILD_TRIED == 0 && ! (-x $VPY && -f $STAMP) ]]
}

# Sets PYTEST (the pytest command) or returns 1 with STAGE_NOTE set when pytest is missing.
pytest_cmd() {
    PYTEST=("${PYENV[@]}" "FASTBLOCKS_REQUIRE_BACKENDS=cuda,triton,cpu" "$VPY" -m pytest)
    dry && return 0
    MISSING_TOOLS=""
    ensure_test_tools
    if ! "$VPY" -c 'import pytest' 2>/dev/null; then
        STAGE_NOTE="pytest is not installed (system-wide nor in $VENV) and there is no network: carry a wheelhouse (GPU_CHECK_WHEELHOUSE)"
        log "$STAGE_NOTE"
        return 1
    fi
    if ! "$VPY" -c 'import pytest_benchmark' 2>/dev/null; then
        # pyproject's addopts has --benchmark-skip, an unknown option without the plugin.
        PYTEST+=(-o "addopts=-ra")
        log "pytest-benchmark missing: running with -o addopts=-ra"
    fi
}

# The test folders and files, the kernels' (ops, nn) first: a timeout then cuts the rest.
test_paths() {
    local p first=(tests/ops tests/nn) out=()
    for p in "${first[@]}"; do [[ -d $p ]] && out+=("$p"); done
    for p in tests/*/ tests/test_*.py; do
        p=${p%/}
        [[ " ${first[*]} " == *" $p "* || ! -e $p ]] && continue
        [[ -d $p && -z $(find "$p" -name 'test_*.py' -print -quit) ]] && continue
        out+=("$p")
    done
    printf '%s\n' "${out[@]}"
}

run_pytest_stage() { # junit-name marker-expression
    pytest_cmd || return 3
    local rc paths
    mapfile -t paths < <(test_paths)
    run_step "$(step_limit)" "${PYTEST[@]}" -q -m "$2" --durations=30 --junitxml="$OUT/$1.junit.xml" \
        -p no:cacheprovider "${paths[@]}"
    rc=$?
    dry && return 0
    STAGE_NOTE="$(pytest_result)"
    [[ -z $STAGE_NOTE ]] && STAGE_NOTE="no pytest summary line (see $1.log)"
    [[ $rc -eq 124 ]] && STAGE_NOTE="TIMED OUT; $STAGE_NOTE"
    [[ ${MISSING_TOOLS:-} == *pytest-benchmark* ]] && STAGE_NOTE="$STAGE_NOTE (pytest-benchmark missing)"
    return "$rc"
}

stage_test() { run_pytest_stage test "not slow"; }
stage_test_slow() { run_pytest_stage test-slow "slow"; }

# The "fastblocks bench: N measurements in S s" lines and the failure notes of the stage log.
bench_result() {
    local n fails
    n=$(grep -cE '^fastblocks bench: [0-9]+ measurements' "$STAGE_LOG")
    fails=$(grep -cE '^note: .*failed' "$STAGE_LOG")
    echo "$(grep -oE '^fastblocks bench: [0-9]+ measurements in [0-9.]+ s' "$STAGE_LOG" | sed 's/fastblocks bench: //' | paste -sd, -) ($n of $1 parts finished; $fails failure notes)"
}

stage_bench_ops() {
    local rc=0 bench=("${PYENV[@]}" "$VPY" -m fastblocks bench --ops --output "$RESULTS" --no-progress)
    if [[ $SPLIT == 1 ]]; then
        run_step "$(step_limit)" "${bench[@]}" --providers eager,fused || rc=$?
        run_step "$(step_limit)" "${bench[@]}" --providers compile,fused-compile --channels-last || rc=$?
        dry || STAGE_NOTE=$(bench_result 2)
    else
        run_step "$(step_limit)" "${bench[@]}" || rc=$?
        dry || STAGE_NOTE=$(bench_result 1)
    fi
    return "$rc"
}

stage_bench_models() {
    local rc=0 bench=("${PYENV[@]}" "$VPY" -m fastblocks bench --output "$RESULTS" --no-progress) mem mem_rc=0
    if [[ $SPLIT == 1 ]]; then
        run_step "$(step_limit)" "${bench[@]}" --models resnet50,densenet201 \
            --providers eager,checkpoint,fused,folded || rc=$?
    else
        run_step "$(step_limit)" "${bench[@]}" --models resnet50,densenet201 || rc=$?
    fi
    # fastblocks memory: one training step per implementation (allocator statistics).
    mem=("${PYENV[@]}" "$VPY" -m fastblocks memory densenet201 --device cuda --batch-size 64 --channels-last --quiet)
    run_step "$(step_limit)" "${mem[@]}" --plot "$RESULTS/memory_densenet201.png" || mem_rc=$?
    if dry; then
        run_step "$(step_limit)" "${mem[@]}" --json
    elif [[ $(step_limit) -ge $MIN_STEP_S ]]; then # JSON to its own file, not into the log
        log "+ (same) --json > $RESULTS/memory_densenet201.json"
        timeout -s INT -k 10 "$(step_limit)" "${mem[@]}" --json >"$RESULTS/memory_densenet201.json" 2>>"$STAGE_LOG" ||
            mem_rc=$?
        log "[memory --json rc=$mem_rc]"
    fi
    [[ $mem_rc -ne 0 ]] && rc=$mem_rc
    if [[ $SPLIT == 1 ]]; then
        run_step "$(step_limit)" "${bench[@]}" --models resnet50 --providers compile,fused-compile || rc=$?
        run_step "$(step_limit)" "${bench[@]}" --models densenet201 --providers compile,fused-compile || rc=$?
        dry || STAGE_NOTE=$(bench_result 3)
    else
        dry || STAGE_NOTE=$(bench_result 1)
    fi
    dry || STAGE_NOTE="$STAGE_NOTE; fastblocks memory densenet201 rc=$mem_rc"
    return "$rc"
}

stage_pytest_bench() {
    pytest_cmd || return 3
    if ! dry && ! "$VPY" -c 'import pytest_benchmark' 2>/dev/null; then
        STAGE_NOTE="pytest-benchmark is not installed and there is no network: carry a wheelhouse (GPU_CHECK_WHEELHOUSE)"
        return 3
    fi
    local rc
    run_step "$(step_limit)" "${PYTEST[@]}" -q -p no:cacheprovider benchmarks --benchmark-only \
        --benchmark-json "$OUT/pytest-benchmark.json" --bench-results "$RESULTS"
    rc=$?
    dry && return 0
    STAGE_NOTE="$(pytest_result)"
    [[ -z $STAGE_NOTE ]] && STAGE_NOTE="no pytest summary line (see pytest-bench.log)"
    [[ $rc -eq 124 ]] && STAGE_NOTE="TIMED OUT; $STAGE_NOTE"
    return "$rc"
}

# ------------------------------------------------------------------ driver
run_stage() {
    local stage=$1 var rc t_start
    var=GPU_CHECK_TIMEOUT_${stage//-/_}
    var=${var^^}
    STAGE_LOG=$OUT/$stage.log
    STAGE_LIMIT=${!var:-540}
    STAGE_NOTE=""
    NO_TAIL=0 # a stage that printed its own reasons sets this
    STAGE_T0=$SECONDS
    t_start=$SECONDS
    : >"$STAGE_LOG"
    log "# stage $stage $(date -u +%Y-%m-%dT%H:%M:%SZ): limit ${STAGE_LIMIT}s, $(left_s)s of the budget left, dry_run=$DRY"
    if [[ $(left_s) -lt $MIN_STAGE_S ]] && ! dry; then
        set_row "$stage" skipped 0 "not started: $(left_s)s of GPU_CHECK_BUDGET_S=$BUDGET left"
        write_summary
        say "$stage: skipped (out of budget)"
        return
    fi
    set_row "$stage" running - "started $(date -u +%H:%M:%S) (no result: the run was cut here)"
    write_summary
    say "$stage: started ($(left_s)s of the budget left)"
    "stage_${stage//-/_}"
    rc=$?
    dry && STAGE_NOTE="dry run: commands printed, none run"
    [[ -z $STAGE_NOTE ]] && STAGE_NOTE="see $stage.log"
    log "# stage $stage done: rc=$rc in $((SECONDS - t_start))s: $STAGE_NOTE"
    set_row "$stage" "$rc" $((SECONDS - t_start)) "$STAGE_NOTE"
    write_summary
    say "$stage: rc=$rc in $((SECONDS - t_start))s: $STAGE_NOTE"
    if [[ $rc -ne 0 && $NO_TAIL == 0 ]]; then # the reasons, for the device tool's output tail
        grep -E '^(FAILED|ERROR) ' "$STAGE_LOG" | head -n 25 | sed 's/^/    /'
        tail -n 15 "$STAGE_LOG" | sed 's/^/    | /'
    fi
}

say "repo $REPO, out $OUT, stages: ${STAGES[*]}, budget ${BUDGET}s$(dry && echo ', DRY RUN')"
for stage in "${STAGES[@]}"; do
    if needs_build "$stage"; then
        say "no fastblocks install in $VENV yet: running the build stage first"
        run_stage build
    fi
    run_stage "$stage"
done
echo
cat "$OUT/summary.txt"
status=0
for r in "${ROWS[@]}"; do
    [[ ${ROW_RC[$r]} == 0 ]] || status=1
done
exit "$status"
