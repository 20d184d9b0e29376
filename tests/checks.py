"""Assertions shared by the integration tests: the conservation law and agreement between ranks."""
import torch

# what an unknown compressor's error lists: the built-ins, in order
VALID_NAMES = "valid names: bf16, fp16, grouptopk, int2, int4, int8, none, qsgd, randomk, sign, topk"


def assert_conservation(ranks, atol=1e-5, steps=None):
    """sum_t c_t = sum_t mean_i g_i,t - mean_i e_i,T - e_T, parameter by parameter (DESIGN.md section 1)."""
    w = len(ranks)
    records = ranks[0]["records"]
    steps = range(len(records)) if steps is None else steps
    for name, c0 in records[0]["c"].items():
        applied = sum(records[t]["c"][name] for t in steps)
        true = sum(sum(ranks[r]["records"][t]["g"][name] for r in range(w)) / w for t in steps)
        worker = sum(ranks[r]["worker_residual"].get(name, torch.zeros_like(c0)) for r in range(w)) / w
        server = sum(ranks[r]["server_residual"].get(name, torch.zeros_like(c0)) for r in range(w))
        scale = 1 + max(float(x.abs().max()) for x in (applied, true, worker, server))
        torch.testing.assert_close(applied, true - worker - server, rtol=0, atol=atol * scale,
                                   msg=lambda m: f"conservation broken for {name}: {m}")


def assert_same_update_everywhere(ranks):
    for t, rec in enumerate(ranks[0]["records"]):
        for r in ranks[1:]:
            for name, c in rec["c"].items():
                assert torch.equal(c, r["records"][t]["c"][name]), f"ranks disagree on {name} at step {t}"


def residuals_by_name(collective, named_numels):
    """({name: worker residual}, {name: server residual, this rank's owned blocks in place, zero elsewhere}) of a
    `DoubleSqueezeCollective` whose tensors are keyed by parameter name; `named_numels` is [(name, numel)]."""
    worker, server = collective.worker_residuals(), collective.server_residuals()
    w, s = {}, {}
    for name, numel in named_numels:
        if name in worker:
            w[name] = worker[name].detach().cpu().clone()
        if name in server:
            s[name] = collective.expand_server_residual(name, server[name], numel).cpu()
    return w, s


def shut_down_and_exit() -> None:
    """End a torch.distributed test worker: a barrier (no rank tears down its Gloo pairs while another is still
    using them), destroy the process group, then leave without interpreter finalisation. Gloo's threads can
    abort the process there ("terminate called without an active exception", SIGABRT; seen once in a few
    hundred runs, see pytorch/pytorch#179291), after every result has been written."""
    import os
    import sys

    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
