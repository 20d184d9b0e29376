"""compressor="auto": the tuner's schedule on given step times, and the engine switching buckets between dense and
compressors with W thread-ranks, checked step by step against plain torch (dense steps) and the Simulator started
from the carried residuals (compressed steps): no mass is lost across any switch."""
import pytest
import torch

import dsq_plugins as dsq
from dsq_plugins.engine.auto import DENSE, MIXED, AutoTuner

from .engine_cases import SIZES, grads_of, make_config

BUCKETS = [["a", "b"], ["c", "d", "e"], ["f"]]


def drive(tuner, cost, steps, buckets=(("x",),), work=None, probe=None, sync=None, sync_async=None):
    """Run `steps` steps: each takes cost(mode, step) seconds of a virtual clock; `work(mode, bucket)` gives
    (seconds, bytes, dense bytes) recorded per bucket; `sync(values, step)` and `sync_async(values, step)` stand for
    the all-reduces (default: one rank's values, blocking only). Returns the mode of every step."""
    clock = [0.0]
    tuner.clock = lambda: clock[0]
    modes = []
    for step in range(steps):
        tuner.on_step_start(step, tuner.clock(),
                            (lambda v: list(v)) if sync is None else (lambda v, s=step: sync(v, s)),
                            None if probe is None else (lambda n, s=step: probe(n, s)),
                            None if sync_async is None else (lambda v, s=step: sync_async(v, s)))
        modes.append(tuner.mode)
        for b in buckets:
            if work is not None:
                tuner.record(tuner.measuring, b, *work(tuner.mode, b))
        clock[0] += cost(tuner.mode, step)
    return modes


def test_explores_every_mode_then_keeps_the_fastest():
    t = AutoTuner(["sign", "topk:0.01"], settle=1, measure=3, check_every=5)
    modes = drive(t, lambda m, s: {"sign": 1.0, "topk:0.01": 0.8, DENSE: 0.9}[m], 30)
    # sign: 1 settle + 3 measured steps; topk: the same; dense: 1 settle + 1 step, dropped (not 1.5x slower, so
    # measured 3 times); then topk for good
    assert modes[:4] == ["sign"] * 4 and modes[4:8] == ["topk:0.01"] * 4 and modes[8:12] == [DENSE] * 4
    assert set(modes[12:]) == {"topk:0.01"}
    assert t.phase == "exploit" and t.times == pytest.approx({"sign": 1.0, "topk:0.01": 0.8, DENSE: 0.9})
    assert t.switches == 3 and [m for _, m in t.history] == ["sign", "topk:0.01", DENSE, "topk:0.01"]


def test_a_slow_mode_costs_one_measured_step():
    t = AutoTuner(["sign"], settle=1, measure=3)
    modes = drive(t, lambda m, s: {"sign": 1.0, DENSE: 13.0}[m], 12)
    assert modes.count(DENSE) == 2                     # its settle step and one measured step, 13x slower
    assert t.mode == "sign" and t.phase == "exploit"


def test_dense_wins_ties_and_near_ties():
    t = AutoTuner(["sign"], prefer_dense=0.03)
    drive(t, lambda m, s: {"sign": 0.98, DENSE: 1.0}[m], 20)
    assert t.mode == DENSE                              # 2% faster is not worth compressing


def test_explores_again_periodically_and_finds_a_faster_link():
    t = AutoTuner(["sign"], check_every=5, reexplore_every=30)
    modes = drive(t, lambda m, s: {"sign": 1.0, DENSE: 3.0 if s < 40 else 0.5}[m], 100)
    assert modes[:30].count(DENSE) == 2                 # explored at the start (slow: dropped after one step)
    assert modes[-1] == DENSE and t.phase == "exploit"   # explored again after 30 steps: the link got faster


def test_drift_when_the_chosen_mode_slows_down():
    t = AutoTuner(["sign"], check_every=5, drift=0.15)
    modes = drive(t, lambda m, s: {"sign": 1.0 if s < 30 else 2.0, DENSE: 1.5}[m], 60)
    assert modes[29] == "sign" and modes[-1] == DENSE


def test_the_exploit_checks_do_not_wait_for_their_all_reduce():
    """With `sync_async`, a check's all-reduce is issued at the step that completes `check_every` steps and read at
    the next one, never waited for where it was issued: the exploit phase makes no blocking all-reduce (dense has no
    probe), and the decisions are the blocking schedule's, one step later."""
    cost = lambda m, s: {"sign": 1.0 if s < 30 else 2.0, DENSE: 1.5}[m]       # noqa: E731
    blocking = AutoTuner(["sign"], check_every=5, drift=0.15)
    modes_blocking = drive(blocking, cost, 60)
    issued, read, waited = [], [], []

    def sync_async(values, step):
        issued.append(step)
        return lambda: read.append(step) or list(values)

    deferred = AutoTuner(["sign"], check_every=5, drift=0.15)
    modes = drive(deferred, cost, 60, sync=lambda v, s: waited.append((s, deferred.phase)) or list(v),
                  sync_async=sync_async)
    assert issued and read == issued                       # every check's mean is read, one step after its issue
    assert all(phase == "explore" for _, phase in waited)  # blocking all-reduces: the explorations' measurements only
    switch = [i for i in range(1, 60) if modes_blocking[i] != modes_blocking[i - 1]]
    late = [i for i in range(1, 60) if modes[i] != modes[i - 1]]
    assert modes_blocking[-1] == modes[-1] == DENSE
    # the first exploration (sign, dense, then sign chosen at step 8) decides at its own steps; the drift after
    # step 30 (sign twice as slow) starts the next exploration, and its switch to dense, one step later
    assert switch[:2] == late[:2] == [4, 8] and late[2:] == [s + 1 for s in switch[2:]]


def test_a_faster_link_is_noticed_by_the_chosen_mode_getting_faster():
    """1 Gbit/s -> 10 Gbit/s: sign gains a little (its bytes got cheaper), dense gains a lot; the 10% change in
    sign's own step time starts an exploration, which finds dense."""
    t = AutoTuner(["sign"], check_every=5, reexplore_every=10 ** 6)
    modes = drive(t, lambda m, s: {"sign": 1.64 if s < 30 else 1.39, DENSE: 1.84 if s < 30 else 1.2}[m], 60)
    assert modes[29] == "sign" and modes[-1] == DENSE


def test_a_faster_link_under_a_compute_bound_mode_is_found_by_the_probe():
    """sign's step is its compression work and compute (1.0 s) on either link, so its own time never moves; the
    probe's all-reduces see the link go from 12.5 MB/s to 1.25 GB/s, and dense's predicted step (1.0 - 0.4 s of
    compression + 150 MB of ring bytes over the link) beats sign: it explores, and measures dense faster."""
    def link(step):
        return 12.5e6 if step < 60 else 1.25e9

    def probe(nbytes, step):
        return 1e-4 + nbytes * 1.5 / link(step)
    cost = lambda m, s: 1.0 if m == "sign" else (0.6 + 150e6 / link(s))       # noqa: E731
    t = AutoTuner(["sign"], check_every=5, reexplore_every=10 ** 6, probe_every=10)
    t.ring = 1.5                                   # 4 ranks: a ring all-reduce moves 1.5 bytes per buffer byte
    modes = drive(t, cost, 120, work=lambda m, b: (0.4, 5e6, 150e6), probe=probe)
    assert modes[59] == "sign" and modes[-1] == DENSE
    assert t.bandwidth == pytest.approx(1.25e9, rel=1e-6)
    slow = AutoTuner(["sign"], check_every=5, reexplore_every=10 ** 6, probe_every=10)
    slow.ring = 1.5
    modes = drive(slow, lambda m, s: 1.0 if m == "sign" else 12.6, 120, work=lambda m, b: (0.4, 5e6, 150e6),
                  probe=lambda n, s: 1e-4 + n * 1.5 / 12.5e6)
    assert modes[-40:] == ["sign"] * 40 and modes.count(DENSE) == 2      # probed, never explored again


def test_noise_does_not_keep_it_exploring():
    """Step times that wander around their means (tiny steps, a shared machine). At +-12% no check leaves the band:
    its reference is the chosen mode's first `check_every` steps in exploitation, not the exploration's few. At
    +-25% the first drifts start explorations that change nothing, the band widens, and the explorations stop."""
    import random
    for amplitude, most in ((0.12, 0), (0.25, 2)):
        rng = random.Random(0)
        t = AutoTuner(["sign"], check_every=5, drift=0.1, reexplore_every=10 ** 6)
        modes = drive(t, lambda m, s: {"sign": 1.5, DENSE: 1.0}[m] * (1 + rng.uniform(-amplitude, amplitude)), 400)
        again = [i for i in range(1, 400) if modes[i] == "sign" and modes[i - 1] != "sign"]
        assert len(again) <= most and modes[-200:] == [DENSE] * 200, (amplitude, again)
        assert (t._drift_now > t.drift) == (most > 0), amplitude


def test_confirmed_choices_back_off():
    t = AutoTuner(["sign"], check_every=5, reexplore_every=20)
    modes = drive(t, lambda m, s: {"sign": 1.0, DENSE: 13.0}[m], 400)
    starts = [i for i in range(1, len(modes)) if modes[i] == DENSE and modes[i - 1] != DENSE]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert len(starts) >= 3 and all(b > 1.5 * a for a, b in zip(gaps, gaps[1:])), starts
    assert modes.count(DENSE) <= 2 * len(starts)         # each costs its settle step and one measured step


def test_mixed_assignment_from_work_and_bytes():
    """Bucket "big" saves many bytes for little work, "small" saves few for as much: the link's throughput from
    the two pure modes says compress the first only; the mix is measured, and kept when fastest."""
    def work(mode, b):
        if mode == DENSE:
            return 0.0, 2000, 2000
        return (0.1, 100, 2000) if b == ("big",) else (0.1, 90, 100)
    cost = {"sign": 1.0, DENSE: 1.2, MIXED: 0.9}
    t = AutoTuner(["sign"])
    modes = drive(t, lambda m, s: cost[m], 30, buckets=[("big",), ("small",)], work=work)
    assert MIXED in modes and t.mode == MIXED
    assert t.assignment == {("big",): "sign", ("small",): None}
    assert t.choice(("big",)) == "sign" and t.choice(("small",)) is None and t.choice(("other",)) == "sign"


def test_config():
    c = dsq.DoubleSqueezeConfig(compressor="auto")
    assert c.auto and c.candidate_specs == ["int4:128"]
    with pytest.raises(ValueError, match="fixed compressor"):
        dsq.Simulator(2, c)
    with pytest.raises(ValueError, match="auto"):
        c.worker


# ------------------------------------------------------------------------------------ the engine, switching


def run_auto(world, config, steps, cost, logdir=None, nan_at=None):
    """W thread-ranks under auto, each with a virtual clock that advances by cost[mode] per step. Per rank and
    step: the updates, the per-bucket spec used, the residuals after the step (worker, and this rank's server
    blocks expanded)."""
    def rank_main(comm):
        monitor = dsq.TensorBoardMonitor(str(logdir)) if logdir is not None and comm.rank == 0 else None
        col = dsq.DoubleSqueezeCollective(config, comm, monitor=monitor, chunk_elements=128)
        clock = [0.0]
        col.auto.clock = lambda: clock[0]
        col.auto.settle, col.auto.measure, col.auto.check_every, col.auto.probe_every = 1, 2, 3, 2
        col.auto._probe_holdoff = 2
        out = []
        for t in range(steps):
            g = grads_of(t, comm.rank, torch.float64)
            if nan_at == (t, comm.rank):
                g["a"][3] = float("nan")
            got, specs = {}, {}
            for keys in BUCKETS:
                outs = col.reduce([(k, g[k]) for k in keys])
                got.update(zip(keys, outs))
                specs[tuple(keys)] = col.auto.choice(tuple(keys))
            col.finish_step()
            clock[0] += cost[col.auto.mode]
            w = {k: v.clone() for k, v in col.worker_residuals().items()}
            s = {k: col.expand_server_residual(k, v, SIZES[k]) for k, v in col.server_residuals().items()}
            out.append({"c": got, "specs": specs, "w": w, "s": s, "mode": col.auto.mode})
        if monitor is not None:
            monitor.close()
        return out, col
    return dsq.ThreadWorld(world).run(rank_main)


@pytest.mark.parametrize("world", [2, 3])
def test_switches_lose_nothing(world, tmp_path):
    config = make_config("auto", candidates="sign,topk:0.2+int4")
    cost = {"sign": 1.0, "topk:0.2+int4": 0.8, DENSE: 0.9, MIXED: 0.7}
    steps = 18
    ranks = run_auto(world, config, steps, cost, logdir=tmp_path / "tb")
    runs = [r[0] for r in ranks]
    used = [runs[0][t]["specs"][("a", "b")] for t in range(steps)]
    assert "sign" in used and "topk:0.2+int4" in used and None in used        # it went through every mode
    zero = {k: torch.zeros(n, dtype=torch.float64) for k, n in SIZES.items()}
    prev_w = [dict(zero) for _ in range(world)]
    prev_s = dict(zero)
    for t in range(steps):
        grads = [grads_of(t, r, torch.float64) for r in range(world)]
        w_now = [{k: runs[r][t]["w"].get(k, zero[k]) for k in SIZES} for r in range(world)]
        s_now = {k: sum(runs[r][t]["s"].get(k, zero[k]) for r in range(world)) for k in SIZES}
        for keys in BUCKETS:
            spec = runs[0][t]["specs"][tuple(keys)]
            for k in keys:
                for r in range(world):
                    assert torch.equal(runs[r][t]["c"][k], runs[0][t]["c"][k])    # every rank agrees
                if spec is None or SIZES[k] < config.min_numel:
                    # dense: each rank's gradient plus its residual, plus the server residual (all flushed)
                    expected = sum(grads[r][k] + prev_w[r][k] for r in range(world)) / world + prev_s[k]
                    assert all(not torch.count_nonzero(w_now[r][k]) for r in range(world))
                    assert not torch.count_nonzero(s_now[k])
                else:
                    fixed = dsq.DoubleSqueezeConfig(**dict(config.to_dict(), compressor=spec, candidates=None))
                    sim = dsq.Simulator(world, fixed, key=k)
                    sim.steps = t
                    sim.worker_errors = [prev_w[r][k].clone() for r in range(world)]
                    sim.server_error = prev_s[k].clone()
                    expected = sim.step([grads[r][k] for r in range(world)])
                    for r in range(world):
                        torch.testing.assert_close(w_now[r][k], sim.worker_errors[r], rtol=1e-12, atol=1e-14)
                    torch.testing.assert_close(s_now[k], sim.server_error, rtol=1e-12, atol=1e-14)
                torch.testing.assert_close(runs[0][t]["c"][k], expected, rtol=1e-12, atol=1e-14,
                                           msg=lambda m: f"step {t} tensor {k} ({spec}): {m}")
        prev_w, prev_s = w_now, s_now
    # the conservation law over the whole run
    for k in SIZES:
        applied = sum(runs[0][t]["c"][k] for t in range(steps))
        true = sum(sum(grads_of(t, r, torch.float64)[k] for r in range(world)) / world for t in range(steps))
        held = sum(prev_w[r][k] for r in range(world)) / world + prev_s[k]
        torch.testing.assert_close(applied, true - held, rtol=0, atol=1e-12)
    col = ranks[0][1]
    assert col.flushes > 0 and col.auto.switches >= 3
    assert col.auto.predicted_dense is not None           # the link was probed (timed all-reduces, every rank)
    totals = col.totals
    assert totals.dense_buckets > 0 and totals.compressed_buckets > 0
    # the choice in TensorBoard: mode by step (0 dense, 1 sign, 2 topk), the modes' measured step times
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    logged = [e.value for e in events.Scalars("dsq/auto/mode")]
    assert len(logged) == steps and {0.0, 1.0, 2.0} <= set(logged)
    assert [e.value for e in events.Scalars("dsq/auto/step_seconds/sign")][-1] == pytest.approx(1.0)


def test_a_nan_on_the_switch_to_dense_keeps_the_residuals():
    """The step a bucket goes dense carries its residuals; if that step is skipped (a NaN on some rank), they are
    held again, not lost: after it, every residual is what it was before, and the law holds over the other steps."""
    config = make_config("auto", candidates="sign")
    cost = {"sign": 1.0, DENSE: 0.9, MIXED: 0.7}
    dry = run_auto(2, config, 10, cost)[0][0]
    used = [dry[t]["specs"][("a", "b")] for t in range(10)]
    t_switch = next(t for t in range(1, 10) if used[t] is None and used[t - 1] is not None)
    ranks = run_auto(2, config, 10, cost, nan_at=(t_switch, 1))
    runs = [r[0] for r in ranks]
    assert runs[0][t_switch]["specs"][("a", "b")] is None
    assert torch.isnan(runs[0][t_switch]["c"]["a"]).all() and torch.isnan(runs[0][t_switch]["c"]["b"]).all()
    for r in range(2):
        for k in ("a", "b"):
            assert torch.count_nonzero(runs[r][t_switch - 1]["w"][k])
            assert torch.equal(runs[r][t_switch]["w"][k], runs[r][t_switch - 1]["w"][k])
    steps = [t for t in range(10) if t != t_switch]
    zero = {k: torch.zeros(n, dtype=torch.float64) for k, n in SIZES.items()}
    for k in ("a", "b"):
        applied = sum(runs[0][t]["c"][k] for t in steps)
        true = sum(sum(grads_of(t, r, torch.float64)[k] for r in range(2)) / 2 for t in steps)
        held = sum(runs[r][9]["w"].get(k, zero[k]) for r in range(2)) / 2 + \
            sum(runs[r][9]["s"].get(k, zero[k]) for r in range(2))
        torch.testing.assert_close(applied, true - held, rtol=0, atol=1e-12)
