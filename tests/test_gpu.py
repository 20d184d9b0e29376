"""The engine on CUDA: every compressor against its CPU result, the engine with 4 ranks on one GPU (`ThreadWorld`)
against the Simulator, DDP over NCCL (world size 1) with the hook, whose step runs with no host
synchronisation, the parameter server's codec passes on CUDA against the CPU's (numba kernels there) and an
asynchronous-parameter-server worker with a CUDA model against one with the same model on the CPU (needs pyzmq,
which the GPU machine's image lacks: skipped there, with the reason).

Skipped, with the reason, without CUDA (CI has no GPU). `tools/gpu_check.sh` runs them on a machine with one, with
pytest or, where there is none (the GPU machine's image), as ``python3 -m tests.test_gpu``.
"""
import os
import socket
import sys
import traceback

import torch

import dsq_plugins as dsq

from .engine_cases import SIZES, make_config, run_world, simulate

try:
    import pytest
    pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                    reason="needs CUDA (run tools/gpu_check.sh on a machine with a GPU)")
except ImportError:           # the GPU machine's image: run by main() below
    pytest = None

class _Skip(Exception):
    """A test that cannot run here (without pytest: reported as SKIP by `main`)."""


def _skip(reason: str):
    if pytest is not None:
        pytest.skip(reason)
    raise _Skip(reason)


SPECS = ["none", "fp16", "bf16", "sign", "topk:0.01", "topk:0.3", "randomk:0.1", "qsgd:16", "int8", "int8:7"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _batch(rows, cap, dtype, lengths=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cap, generator=g, dtype=torch.float64).to(dtype)
    if lengths is not None:
        x[torch.arange(cap)[None, :] >= lengths[:, None]] = 0
    return x


def test_every_compressor_on_cuda_equals_cpu():
    """Batched encode/decode of full rows and of tail rows (lengths) on CUDA give the CPU's fields and values."""
    for spec in SPECS:
        c = dsq.get_compressor(spec)
        for dtype in DTYPES:
            for rows, cap, lengths in ((64, 4096, None), (5, 88, torch.tensor([88, 3, 50, 17, 81]))):
                x = _batch(rows, cap, dtype, lengths, seed=rows)
                seeds = torch.arange(rows, dtype=torch.int64) * 7919 + 1 if c.uses_seed else None
                out = {}
                for dev in ("cpu", "cuda"):
                    xx, ll, ss = (None if t is None else t.to(dev) for t in (x, lengths, seeds))
                    fields = c.encode(xx, ll, ss)
                    out[dev] = (fields, c.decode(fields, cap, dtype, ll, ss).cpu())
                (f_cpu, y_cpu), (f_gpu, y_gpu) = out["cpu"], out["cuda"]
                what = f"{spec} {dtype} {rows}x{cap}"
                assert set(f_cpu) == set(f_gpu), what
                for name in f_cpu:
                    assert (f_cpu[name].dtype, f_cpu[name].shape) == (f_gpu[name].dtype, f_gpu[name].shape), what
                valid = (torch.ones(rows, cap, dtype=torch.bool) if lengths is None
                         else torch.arange(cap)[None, :] < lengths[:, None])
                y_cpu, y_gpu = y_cpu[valid], y_gpu[valid]
                if spec.startswith("qsgd"):           # a norm's last bit may round a level the other way
                    assert (y_cpu != y_gpu).double().mean() < 1e-3, what
                else:
                    rtol = 1e-3 if dtype in (torch.float16, torch.bfloat16) else 2e-6
                    torch.testing.assert_close(y_gpu, y_cpu, rtol=rtol, atol=1e-7, msg=lambda m: f"{what}: {m}")


def test_one_block_compress_on_cuda():
    for spec in SPECS:
        c = dsq.get_compressor(spec)
        x = torch.randn(1000, 7, generator=torch.Generator().manual_seed(1))
        p_cpu, p_gpu = c.compress(x, seed=3), c.compress(x.cuda(), seed=3)
        assert p_cpu.nbytes == p_gpu.nbytes == len(p_gpu.to_bytes()), spec
        y = c.decompress(p_gpu)
        assert y.device.type == "cuda" and y.shape == x.shape, spec
        torch.testing.assert_close(y.cpu(), c.decompress(p_cpu), rtol=1e-5, atol=1e-6)


def test_engine_four_ranks_on_one_gpu_equals_simulator():
    world, steps = 4, 4
    buckets = [["a", "b"], ["c", "d", "e"], ["f"]]
    for spec in ["sign", "topk:0.1", "randomk:0.25", "qsgd:4", "int8:16", "fp16"]:
        config = make_config(spec)
        ranks = run_world(world, config, steps, buckets, chunk_elements=1 << 12, device="cuda")
        expected, sims = simulate(world, config, steps)
        for r, (updates, col) in enumerate(ranks):
            for t in range(steps):
                for k in SIZES:
                    torch.testing.assert_close(updates[t][k], expected[t][k], rtol=1e-5, atol=1e-6,
                                               msg=lambda m: f"{spec} rank {r} step {t} {k}: {m}")
            residual = col.worker_residuals()["a"]
            assert residual.device.type == "cuda"
            torch.testing.assert_close(residual.cpu(), sims["a"].worker_errors[r], rtol=1e-5, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_nccl_hook_equals_simulator_and_never_syncs():
    """DDP over NCCL at world size 1 with the hook: each step's gradients equal the Simulator's, and once the
    plans exist a backward runs under torch.cuda.set_sync_debug_mode("error")."""
    import torch.distributed as dist
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 300)).cuda()
        ddp = DDP(model, device_ids=[0], bucket_cap_mb=0.25)
        config = dsq.DoubleSqueezeConfig(compressor="sign", block_size=1024)
        state = dsq.DoubleSqueezeState(config)
        ddp.register_comm_hook(state, dsq.doublesqueeze_hook)
        params = list(model.parameters())
        sims = [dsq.Simulator(1, config) for _ in params]          # sign draws no seeds: keys do not matter
        x, y = torch.randn(32, 256, device="cuda"), torch.randn(32, 300, device="cuda")
        for step in range(4):
            ref = [p.detach().clone().requires_grad_() for p in params]
            out = nn.functional.linear(torch.relu(nn.functional.linear(x, ref[0], ref[1])), ref[2], ref[3])
            expected = torch.autograd.grad(((out - y) ** 2).mean(), ref)
            ddp.zero_grad()
            torch.cuda.synchronize()
            if step >= 2:
                torch.cuda.set_sync_debug_mode("error")
            try:
                ((ddp(x) - y) ** 2).mean().backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            for p, g, sim in zip(params, expected, sims):
                want = sim.step([g.cpu()])
                torch.testing.assert_close(p.grad.cpu(), want.view_as(p.grad), rtol=1e-5, atol=1e-6)
        assert state.skipped_steps == 0 and state.step == 4
        assert all(r.device.type == "cuda" for r in state.worker_residuals().values())
    finally:
        dist.destroy_process_group()


def test_block_codec_server_passes_on_cuda_equal_cpu():
    """The parameter server's and its workers' passes (`BlockCodec.encode`, `decode_add`, `encode_delta`,
    `apply_delta`, `encode_residual`) on CUDA give the CPU's values (on the CPU, sign takes the numba kernels: an independent implementation)."""
    from dsq_plugins.engine.codec import BlockCodec
    for spec in ["sign", "topk:0.01", "int8", "randomk:0.1"]:
        codec = BlockCodec(dsq.get_compressor(spec), 1024)
        for n in (1000, 3 * 1024 + 17):
            g = torch.Generator().manual_seed(n)
            x, x_hat, u = (torch.randn(n, generator=g) for _ in range(3))
            out = {}
            for dev in ("cpu", "cuda"):
                xs, hs, us = x.to(dev), x_hat.to(dev), u.to(dev)
                frame, sent = codec.encode(us, seed=5)
                assert frame.device.type == sent.device.type == dev
                acc = xs.clone()
                codec.decode_add(frame, acc, -0.5, seed=5)
                held = hs.clone()
                delta = codec.encode_delta(acc, held, seed=9)
                x2, h2 = xs.clone(), hs.clone()
                fused = codec.apply_delta(frame, x2, -0.5, 5, codec, h2, 9)
                left = torch.empty_like(us)
                pushed = codec.encode_residual(us, hs, left, seed=7)
                assert pushed.device.type == left.device.type == dev
                out[dev] = [t.cpu() for t in (sent, acc, held, x2, h2, codec.decode(delta, (n,), torch.float32, 9),
                                              codec.decode(fused, (n,), torch.float32, 9), left,
                                              codec.decode(pushed, (n,), torch.float32, 7))]
                assert frame.numel() == codec.nbytes(n, torch.float32) == delta.numel()
            for k, (a, b) in enumerate(zip(out["cpu"], out["cuda"])):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=lambda m: f"{spec} n={n} #{k}: {m}")


def test_async_worker_with_a_cuda_model_equals_one_on_cpu():
    """Two in-process parameter servers, one worker each, the same model, gradients and sign compression: the CUDA
    worker's parameters and residuals (on the device) equal the CPU worker's after every step."""
    try:
        import zmq  # noqa: F401
    except ImportError:
        _skip("pyzmq is not installed (the GPU machine's image has none): the CUDA worker is untested here")
    import async_ps

    def make(dev, k):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(300, 257), torch.nn.Tanh(), torch.nn.Linear(257, 5)).to(dev)
        srv = async_ps.ParameterServer(bind=f"inproc://gpu-check-{k}", compressor="sign", block_size=1024,
                                       key_elems=1 << 14).start()
        w = async_ps.Worker(m, torch.optim.SGD(m.parameters(), lr=0.1), srv.address, srv.token, worker_id=f"{dev}{k}",
                            context=srv.context)
        return srv, w
    pairs = [make("cpu", 0), make("cuda", 1)]
    try:
        for step in range(5):
            for _, w in pairs:
                for i, p in enumerate(w.params):
                    p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i)).to(
                        p.device)
                assert w.step().status == "applied"
            (_, cpu), (_, gpu) = pairs
            assert all(p.device.type == "cuda" for p in gpu.params)
            for a, b in zip(cpu.params, gpu.params):
                torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-5, atol=1e-5)
            for a, b in zip(cpu.residuals(), gpu.residuals()):
                assert b.device.type == "cuda"
                torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)
    finally:
        for srv, w in pairs:
            w.close()
            srv.stop()


def main() -> int:
    """Run every test of this module without pytest; exit 1 if any fails."""
    if not torch.cuda.is_available():
        print("SKIP: no CUDA")
        return 0
    failed = 0
    for name, fn in sorted((n, f) for n, f in globals().items() if n.startswith("test_") and callable(f)):
        try:
            fn()
            print(f"PASS {name}", flush=True)
        except _Skip as why:
            print(f"SKIP {name}: {why}", flush=True)
        except Exception:                       # report every failure, then exit 1
            failed += 1
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
    print(f"{failed} failed" if failed else "all passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
