#!/usr/bin/env bash
# Deliberate breakages, each in a copy of the working tree: every test listed for a breakage must fail on it, each
# run on its own (and all of them pass on the unbroken copy): a unit test against the Simulator or a plain-torch
# reference, and a multi-process integration test. Prints a line per mutant and test; exits 1 if one survives.
#
#   bash tools/mutants.sh            (about 2 minutes on 2 cores)
#
# Mutants (docs/ARCHITECTURE.md section 9 lists the invariants they break):
#   zeros-up      the worker pass sends zeros and keeps the whole mass in its residual (the conservation law
#                 still holds: only a comparison with an independent reference catches it)
#   frozen-server the server residual is never updated
#   sign-scale    sign's per-block scale is 1.5 times the mean absolute value
set -euo pipefail
set -f                        # test ids hold brackets: no globbing
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

declare -A FILE OLD NEW TESTS
FILE[zeros-up]=dsq_plugins/engine/bucket.py
OLD[zeros-up]='fields = wc.encode(v, None, None if seeds is None else seeds[a:b])'
NEW[zeros-up]='fields = wc.encode(torch.zeros_like(v), None, None if seeds is None else seeds[a:b])'
TESTS[zeros-up]="tests/test_engine.py::test_equals_simulator[2-sign] tests/test_ddp_hook.py::test_gradient_accumulation_with_no_sync tests/test_horovod.py::test_gradient_accumulation"

FILE[frozen-server]=dsq_plugins/engine/bucket.py
OLD[frozen-server]='        if ex.host_skip:
            return
        if ex.host_skip is None:
            new = decode(tmp)'
NEW[frozen-server]='        if ex.host_skip or side is Side.SERVER:
            return
        if ex.host_skip is None:
            new = decode(tmp)'
TESTS[frozen-server]="tests/test_engine.py::test_equals_simulator[2-sign] tests/test_ddp_hook.py::test_gradient_accumulation_with_no_sync tests/test_horovod.py::test_gradient_accumulation"

FILE[sign-scale]=dsq_plugins/compression/compressors.py
OLD[sign-scale]='scale = (l1 / (cap if lengths is None else lengths.to(acc.dtype))).float()'
NEW[sign-scale]='scale = (1.5 * l1 / (cap if lengths is None else lengths.to(acc.dtype))).float()'
TESTS[sign-scale]="tests/test_compressors.py::test_sign tests/test_ddp_hook.py::test_hook_equals_simulator[2-sign---no-server-ef]"

copy() {                       # $1: destination; the working tree's tracked and untracked-but-not-ignored files
    mkdir -p "$1"
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$1")
}

run_tests() {                  # $1: tree, $2...: pytest arguments; prints pytest's exit code
    local tree="$1"; shift
    set +e
    (cd "$tree" && PYTHONPATH="$tree" DSQ_MUTANT=1 timeout 900 "$PY" -m pytest -q -x -p no:cacheprovider "$@" \
        >"$tree.log" 2>&1)
    local rc=$?
    set -e
    echo "$rc"
}

status=0
copy "$WORK/base"
ALL_TESTS="$(printf '%s\n' "${TESTS[@]}" | tr ' ' '\n' | sort -u | tr '\n' ' ')"
rc=$(run_tests "$WORK/base" $ALL_TESTS)
if [ "$rc" != 0 ]; then
    echo "the unbroken tree fails its tests (pytest exit $rc): mutants prove nothing"; tail -20 "$WORK/base.log"
    exit 1
fi
echo "unbroken tree: the tests pass"
for m in zeros-up frozen-server sign-scale; do
    tree="$WORK/$m"
    copy "$tree"
    "$PY" - "$tree/${FILE[$m]}" "${OLD[$m]}" "${NEW[$m]}" <<'PYEOF'
import sys
path, old, new = sys.argv[1:]
text = open(path).read()
if text.count(old) != 1:
    sys.exit(f"mutant site not found once in {path}: {old!r}")
open(path, "w").write(text.replace(old, new))
PYEOF
    for t in ${TESTS[$m]}; do
        rc=$(run_tests "$tree" "$t")
        if [ "$rc" = 1 ]; then
            echo "caught    $m  by $t"
        else
            echo "SURVIVED  $m  $t (pytest exit $rc)"; tail -5 "$tree.log"; status=1
        fi
    done
done
exit $status
