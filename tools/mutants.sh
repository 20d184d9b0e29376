#!/usr/bin/env bash
# Deliberate breakages, each in a copy of the working tree: every test listed for a breakage must fail on it, each
# run on its own (and all of them pass on the unbroken copy): a unit test against the Simulator or a plain-torch
# reference, and a multi-process integration test. Prints a line per mutant and test; exits 1 if one survives.
#
#   bash tools/mutants.sh            (about 8 minutes on 2 cores)
#
# Mutants (docs/ARCHITECTURE.md section 9 lists the invariants they break):
#   zeros-up      the worker pass sends zeros and keeps the whole mass in its residual (the conservation law
#                 still holds: only a comparison with an independent reference catches it)
#   frozen-server the server residual is never updated
#   sign-scale    sign's per-block scale is 1.5 times the mean absolute value
#   no-rescale    under DeepSpeed's fp16 the residuals keep their units when the loss scale changes
#   fp16-keep     a step DeepSpeed skips for an overflow keeps what earlier buckets did to the residual (ZeRO 2/3)
#   reshard-drop  a resume on another number of ranks starts the residuals from zero
#   guard-ignored under ZeRO the guard decides but the uplink keeps its compressor
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

FILE[no-rescale]=deepspeed_ext/loss_scale.py
OLD[no-rescale]='            rescale(scale / self.scale)'
NEW[no-rescale]='            rescale(1.0)'
TESTS[no-rescale]="tests/test_deepspeed_fp16.py::test_fp16_residuals_follow_the_loss_scale_and_an_overflow_changes_nothing[zero1] tests/test_deepspeed_fp16.py::test_fp16_residuals_follow_the_loss_scale_and_an_overflow_changes_nothing[zero2]"

FILE[fp16-keep]=deepspeed_ext/zero_state.py
OLD[fp16-keep]='        if overflow and self._rounds > 0:'
NEW[fp16-keep]='        if overflow and self._rounds < 0:'
TESTS[fp16-keep]="tests/test_deepspeed_fp16.py::test_fp16_residuals_follow_the_loss_scale_and_an_overflow_changes_nothing[zero2] tests/test_deepspeed_fp16.py::test_fp16_zero3_overflow_is_skipped_everywhere_and_restores_the_residual"

FILE[reshard-drop]=dsq_plugins/engine/reshard.py
OLD[reshard-drop]='        worker[key] = sum(p if p is not None else torch.zeros_like(like) for p in parts) / W0'
NEW[reshard-drop]='        worker[key] = torch.zeros_like(like)'
TESTS[reshard-drop]="tests/test_ddp_hook.py::test_resharded_states_keep_the_mass_block_by_block tests/test_ddp_hook.py::test_resume_on_another_number_of_ranks_keeps_the_residuals_mass[3] tests/test_deepspeed.py::test_checkpoint_resume_is_exact_and_on_another_world_size_keeps_the_mass"

FILE[guard-ignored]=deepspeed_ext/zero_state.py
OLD[guard-ignored]='        self.uplink.set_compressor(get_compressor(spec or "none"))'
NEW[guard-ignored]='        pass'
TESTS[guard-ignored]="tests/test_zero2.py::test_zero2_quality_guard_moves_the_uplink_and_loses_nothing"

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
for m in zeros-up frozen-server sign-scale no-rescale fp16-keep reshard-drop guard-ignored; do
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
