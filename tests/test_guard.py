"""The quality guard (`dsq_plugins.engine.guard`): a tensor whose compressor stops contracting moves to the fallback, then
dense, and nothing is lost in the switch.

Two ranks in one process (`ThreadWorld`). Tensor "spiky" has its gradient mass in 1% of its entries (a scaled sign
keeps under 5% of its energy, against 64% on Gaussian data); tensor "gauss" is Gaussian. The reference is the
Simulator (which knows nothing of the guard), run with sign before the switch and with the fallback after it,
started from the residuals the sign phase left, and for a dense switch the plain mean of ``g_i + e_i`` plus ``e``.
"""
import warnings

import pytest
import torch

import dsq_plugins as dsq
from dsq_plugins.engine.collective import DoubleSqueezeCollective
from dsq_plugins.engine.guard import nominal_delta

N = {"spiky": 2048, "gauss": 1000}
B = 256


def grads(step, rank):
    g = torch.Generator().manual_seed(7919 * step + rank)
    spiky = torch.randn(N["spiky"], generator=g, dtype=torch.float64) * 1e-3
    spiky[::100] += 1.0 + 0.1 * torch.randn(len(spiky[::100]), generator=g, dtype=torch.float64)
    return {"spiky": spiky.float(), "gauss": torch.randn(N["gauss"], generator=g).float()}


def run(config, steps, monitor=None):
    world = dsq.ThreadWorld(2)

    def rank_main(comm):
        col = DoubleSqueezeCollective(config, comm, monitor=monitor if comm.rank == 0 else None)
        ups = []
        for t in range(steps):
            g = grads(t, comm.rank)
            outs = col.reduce([(k, g[k]) for k in N])
            ups.append(dict(zip(N, (o.clone() for o in outs))))
            col.finish_step()
        return ups, col
    with warnings.catch_warnings(record=True) as caught:      # (the warnings module is not thread-local)
        warnings.simplefilter("always")
        ranks = world.run(rank_main)
    return ranks, [w for w in caught if issubclass(w.category, dsq.QualityWarning)]


class Recorder(dsq.Monitor):
    def __init__(self):
        super().__init__()
        self.scalars = []

    def log_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def reference(steps, switch_step, after_spec, key, worker_ef=True):
    """Per step, the update of tensor `key`: the Simulator with sign before `switch_step`, then with `after_spec`
    (None: dense) from the residuals sign left; and the final residuals (mean worker, server)."""
    sim = dsq.Simulator(2, dsq.DoubleSqueezeConfig(compressor="sign", block_size=B, min_numel=16, guard=0.0),
                        key=key)
    out = []
    for t in range(steps):
        g = [grads(t, r)[key] for r in range(2)]
        if t == switch_step:
            if after_spec is None:
                ew, es = [e.clone() for e in sim.worker_errors], sim.server_error.clone()
                sim = None
            else:
                old = sim
                sim = dsq.Simulator(2, dsq.DoubleSqueezeConfig(compressor=after_spec, block_size=B, min_numel=16,
                                                               guard=0.0), key=key)
                sim.worker_errors = [e.clone() for e in old.worker_errors]
                sim.server_error = old.server_error.clone()
                sim.steps = old.steps
        if sim is None:
            # dense after the switch: the residuals ride along once, then there are none
            c = (g[0] + g[1]) / 2
            if t == switch_step:
                c = c + (ew[0] + ew[1]) / 2 + es
            out.append(c)
        else:
            out.append(sim.step(g))
    if sim is None:
        return out, torch.zeros(N[key]), torch.zeros(N[key])
    return out, (sim.worker_errors[0] + sim.worker_errors[1]) / 2, sim.server_error


def test_nominal_contraction_of_sign_is_two_over_pi():
    assert abs(nominal_delta("sign", 4096) - 2 / torch.pi) < 0.01
    assert nominal_delta("int4:128", 4096) > 0.98


def test_spiky_tensor_moves_to_the_fallback_after_the_first_sample_and_nothing_is_lost():
    steps = 9
    mon = Recorder()
    cfg = dsq.DoubleSqueezeConfig(compressor="sign", block_size=B, min_numel=16)        # guard on by default
    assert cfg.guard > 0 and cfg.fallback == "int4:128"
    ranks, caught = run(cfg, steps, mon)
    col = ranks[0][1]
    switches = col.guard.switches
    # the first sample (step 0) decides at step 1: spiky fails its worker pass; gauss keeps sign
    assert [(s.step, s.key, s.to, s.pass_) for s in switches] == [(1, "spiky", "int4:128", "worker")]
    assert switches[0].delta < 0.15 * switches[0].nominal
    assert len(caught) == 2, "one warning per rank"
    assert all("spiky" in str(w.message) and "int4:128" in str(w.message) for w in caught)
    for ups, c in ranks:
        assert [(s.key, s.to) for s in c.guard.switches] == [("spiky", "int4:128")], "ranks decided differently"
    assert ("dsq/guard/spiky", 1.0, 1) in mon.scalars and ("dsq/guard/switches", 1.0, 1) in mon.scalars

    for key, switch, after in (("spiky", 1, "int4:128"), ("gauss", None, None)):
        ref, ref_w, ref_s = reference(steps, switch if switch is not None else steps + 1, after, key)
        for r, (ups, c) in enumerate(ranks):
            for t in range(steps):
                torch.testing.assert_close(ups[t][key], ref[t].float(), rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"rank {r} step {t} {key}: {m}")
        # conservation across the switch: applied = true mean - mean worker residual - server residual
        applied = sum(ranks[0][0][t][key] for t in range(steps)).double()
        true = sum((grads(t, 0)[key] + grads(t, 1)[key]).double() / 2 for t in range(steps))
        w = sum(c.worker_residuals()[key].double() for _, c in ranks) / 2
        s = sum(c.expand_server_residual(key, c.server_residuals()[key], N[key]).double() for _, c in ranks)
        torch.testing.assert_close(applied, true - w - s, rtol=0, atol=1e-4)
        torch.testing.assert_close(w.float(), ref_w.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s.float(), ref_s.float(), rtol=1e-5, atol=1e-6)
        # and the switch sent something: the update is not zero, the residual is not holding the mass
        assert float(applied.norm()) > 0.5 * float(true.norm())


def test_fallback_none_sends_the_tensor_dense_with_its_residuals():
    steps = 5
    cfg = dsq.DoubleSqueezeConfig(compressor="sign", block_size=B, min_numel=16, fallback=None)
    ranks, _ = run(cfg, steps)
    col = ranks[0][1]
    assert [(s.step, s.key, s.to) for s in col.guard.switches] == [(1, "spiky", None)]
    ref, _, _ = reference(steps, 1, None, "spiky")
    for r, (ups, c) in enumerate(ranks):
        for t in range(steps):
            torch.testing.assert_close(ups[t]["spiky"], ref[t].float(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"rank {r} step {t}: {m}")
        assert "spiky" not in c.worker_residuals() and "spiky" not in c.server_residuals()
    applied = sum(ranks[0][0][t]["spiky"] for t in range(steps)).double()
    true = sum((grads(t, 0)["spiky"] + grads(t, 1)["spiky"]).double() / 2 for t in range(steps))
    torch.testing.assert_close(applied, true, rtol=0, atol=1e-4)      # dense now: no mass held anywhere


def test_guard_off_keeps_sign_and_its_growing_residual():
    steps = 9
    ranks, _ = run(dsq.DoubleSqueezeConfig(compressor="sign", block_size=B, min_numel=16, guard=0.0), steps)
    col = ranks[0][1]
    assert col.guard is None
    g = torch.stack([grads(t, 0)["spiky"] for t in range(steps)]).norm(dim=1).mean()
    assert float(col.worker_residuals()["spiky"].norm()) > 3 * float(g)        # what the guard is there for


def test_guard_decisions_survive_a_checkpoint():
    cfg = dsq.DoubleSqueezeConfig(compressor="sign", block_size=B, min_numel=16)
    ranks, _ = run(cfg, 4)
    sd = ranks[0][1].state_dict()
    world = dsq.ThreadWorld(1)

    def load(comm):
        col = DoubleSqueezeCollective(cfg, comm)
        col.guard.load_state_dict(sd["guard"])
        return col.guard.spec_for("spiky", "sign"), col.guard.spec_for("gauss", "sign")
    assert world.run(load)[0] == ("int4:128", "sign")


@pytest.mark.parametrize("bad, message", [
    (dict(guard=1.5), "guard must be a number in [0, 1)"),
    (dict(guard="yes"), "guard must be a number in [0, 1)"),
    (dict(fallback="none"), "does not compress"),
    (dict(fallback="int9"), "valid names"),
])
def test_bad_guard_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        dsq.DoubleSqueezeConfig(**bad)
