"""A bandwidth-limited cluster on one machine: DoubleSqueeze against dense and torch's compression hooks, for DDP,
Horovod and DeepSpeed, side by side in one invocation. Needs root.

    python benchmarks/cluster.py --quick --json runs/bench/cluster.json          # 100mbit, about 3.5 minutes
    python benchmarks/cluster.py --bandwidth 100mbit,1gbit,10gbit --json runs/bench/cluster.json

The cluster (benchmarks/netns.py): --hosts network namespaces (default 4), one rank each, joined by a Linux bridge;
every host's link is shaped with tc's token-bucket filter in both directions (on the host's eth0 and on its bridge
port), so each host has a full-duplex link of the given rate. Ranks bind to eth0 (GLOO_SOCKET_IFNAME / Horovod's
--network-interface), MASTER_ADDR is host 0's address. The namespaces, veths and bridge carry the prefix
`dsqc<pid>`; they are removed on exit, on SIGINT/SIGTERM/SIGHUP and on failure, and a set left by a killed run is
removed at the next start. Without root the script refuses (exit status 2) before creating anything.

Model: MLP 1024-4096-4096-1000 (25.1M parameters; --hidden), batch 32 per rank (--batch), synthetic data,
torch.set_num_threads(1) and OMP_NUM_THREADS=1 per rank. Methods (one job each, the same model, data, seeds and
steps; SGD, lr 0.01):
    dense            DDP, no hook (gloo ring allreduce of fp32 gradients)
    ddp-fp16         DDP + torch's default_hooks.fp16_compress_hook
    ddp-powersgd     DDP + torch's powerSGD_hook: matrix_approximation_rank 2, start_powerSGD_iter 2, warm_start,
                     use_error_feedback, min_compression_rate 2 (its defaults otherwise); DDP bucket_cap_mb 1024
                     (one bucket: with several, the hook deadlocks on Gloo, see the worker)
    ddp-hook         (named only) DDP + torch's default_hooks.allreduce_hook: the built-in's all-reduce as
                     a Python comm hook (what any hook costs against DDP's C++ path, which folds the
                     division by W into its bucket copy)
    dsq-dense        (named only) DDP + dsq_plugins.doublesqueeze_hook whose warm-up never ends:
                     DoubleSqueeze's dense path alone (what auto's dense mode runs)
    dsq-int4:128     DDP + dsq_plugins.doublesqueeze_hook, DoubleSqueezeConfig() (its default compressor, int4:128)
    dsq-sign         the same with compressor "sign"
    dsq-topk:0.01    the same with compressor "topk:0.01"
    dsq-topk:0.01+int4    the same, top-1% with its values in 4 bits (+ a min and step per block)
    dsq-grouptopk:0.03+sign, dsq-grouptopk:0.03+int4   the 3% of groups of 32 elements of largest energy, their
                     values in 1 bit (+ a block scale) or 4 bits
    dsq-auto         the same with compressor "auto" (its default candidates, int4:128, and dense): it chooses
                     from its own step times. The link changes between phases, and it has to notice: each phase runs
                     --adapt-steps steps first (recorded: the mean step time over them includes its explorations),
                     then the measured steps
    hvd-stock        horovodrun, hvd.DistributedOptimizer (allreduce, no compression)
    hvd-dsq-sign     dsq-horovodrun --dsq-compressor sign, horovod_ext.DistributedOptimizer
    ds-stock         DeepSpeed ZeRO stage 0, fp32, gradient_clipping 0
    ds-dsq-sign      deepspeed_ext.initialize with {"doublesqueeze": {"enabled": true, "compressor": "sign"}}
    ds-zN-stock      DeepSpeed ZeRO stage N (2: overlap_comm and contiguous_gradients on; 3: DeepSpeed's defaults)
    ds-zN-dsq-SPEC   the same with {"doublesqueeze": {"enabled": true, "compressor": SPEC}} (ZeRO-3: int8 parameter
                     gathers); compared with ds-zN-stock, with DoubleSqueeze's persistent bytes per rank; SPEC auto
                     adapts each phase, as dsq-auto
    fsdp-stock       FSDP2: fully_shard on each Linear (reshard_after_forward=False) and on the model
    fsdp-stock-reshard   the same with the Linears resharded after forward (ZeRO-3-like: two gathers per step)
    fsdp-dsq-SPEC    fsdp-stock + dsq_plugins.fsdp.install(compressor SPEC, downlink "delta"); SPEC int4:128, sign,
                     or auto (adapting each phase, as dsq-auto)
    fsdp-dsq-SPEC-quantized   fsdp-stock-reshard + install(compressor SPEC, downlink "quantized": int8 gathers)
    hsdp-stock       HSDP, FSDP2's own: --hosts/2 "nodes" of 2 ranks each (the first --hosts/2 hosts run two ranks,
                     the others none), fully_shard on a 2-D mesh (replicate across nodes, shard inside a node,
                     reshard_after_forward=False); inside a node the ranks talk over the node's own loopback
                     (unshaped), across nodes over the shaped link
    hsdp-dsq-SPEC    the same nodes: fully_shard on the node's 1-D mesh and install(compressor SPEC,
                     replicate_group=the ranks holding the same shard): the replicas' all-reduce of each shard is
                     the double pass; FSDP's reduce-scatter and all-gather inside the node stay FSDP's own
    hsdp-dsq-SPEC-bf16   the same with residual_dtype=torch.bfloat16 (both residuals in bfloat16)
    hsdp-dsq-auto    the same under compressor "auto" (dense or int4:128 for the replicas' exchange, adapting each
                     phase, as dsq-auto)
    pair:M           M (a DDP, FSDP2 or HSDP DoubleSqueeze method, or ddp-hook) and its baseline (dense
                     DDP; FSDP2's and HSDP's own stock method) in one job, each on its own copy of the
                     model, stepped alternately on the same batches (the baseline first at one step,
                     second at the next); auto's clock stops while the baseline steps.
                     Reported: the per-step ratio of their times (median with a 95% interval, quartiles), which
                     the machine's drift between phases and jobs does not reach; bytes are not separated
    The FSDP2 and HSDP methods also report their persistent memory per rank (FSDP's shards and what install keeps)
    and compare with their own stock method. The HSDP methods' bytes are per node (the two ranks of a node share
    its interface): "per rank" is then the busiest node's.

Horovod is launched by the real horovodrun (Gloo), run inside host 0's namespace with `-H <ip0>:1,<ip1>:1,...
--network-interface eth0`: host 0 is local to it, and it reaches the other hosts through a stand-in `ssh`
(first on PATH) that runs the command with `ip netns exec <host's namespace> sh -c`. Every host has its own
/etc/hosts in which the machine's host name resolves to the host's address (Horovod's Gloo binds process-set
contexts to that address; with the shared /etc/hosts it was 127.0.0.1 and the ranks could not connect).

Each job has phases: --warmup steps on the unshaped link, then --steps steps on the unshaped link ("compute"),
then --steps steps at each bandwidth. Between phases the workers wait for the parent (a file in the run folder)
while it changes the shaping. Reported per method and bandwidth:
    step time     median over the steps of the slowest rank's step time (seconds)
    bytes/step    what all hosts sent, and per rank (the larger of sent and received, of the busiest rank),
                  counted by the kernel on each host's interface from after warm-up to the end of the phase
                  (the barriers that open and close a phase are included; TCP/IP headers too)
    compute       the same job's median step time on the unshaped link: forward, backward, compression,
                  optimizer and the (fast, a few Gbit/s) unshaped veth; everything except the shaped wire
    floor         compute + bytes per rank / effective bandwidth (what the wire must carry, at the rate the link
                  actually delivers: a TCP stream between two hosts, measured at the start, bytes counted like
                  the jobs' bytes); `vs floor` = step time / floor
    break-even    bandwidth below which the DoubleSqueeze method is faster than its dense baseline:
                  B = (bytes_dense - bytes_dsq) / (compute_dsq - compute_dense), per rank; infinite when the
                  DoubleSqueeze method computes no slower than dense
All ranks share this machine's cores (4 ranks on 2 cores here): compute time includes that contention.

Where PowerSGD beats DoubleSqueeze, and why: rank-2 PowerSGD sends, per weight matrix n x m, the factors P (n x 2)
and Q (m x 2): 4 * 2 (n + m) bytes instead of n m / 8 for sign (1 bit per element). For 4096x4096 that is 64 KiB
against 2 MiB; measured here, 0.29 MB per rank per step against sign's 5.0 MB (dense: 155 MB). Both move their
payload about twice per rank (ring allreduce / all-to-all up plus all-gather down), so the byte ratio is the
payload ratio, and it grows with the layer size. Its extra compute (thin matmuls, an orthogonalisation, its error
feedback) is comparable to sign's, so at 100 Mbit/s it was as fast or faster (--quick: 1.09 s/step against 1.25).
Its limits: it is biased in its own way (a low-rank approximation; it needs its own error feedback and warm start
to converge), compresses matrices only (vectors and small layers go dense), is a DDP hook only, and with Gloo it
must run in one bucket (see the worker), so it cannot overlap communication with the backward pass. DoubleSqueeze
takes any compressor (also unbiased ones), keeps both residuals, and runs under DDP, Horovod and DeepSpeed.

Notes on the figures. 4 ranks share 2 cores here, so compute time includes that contention, and ranks drift apart
by a tenth of a second or two; the "compute" figure includes the unshaped collectives and that waiting for the
slowest rank, which in the shaped phases overlaps the wire, so the floor is not a strict lower bound and `vs floor`
can come out a little below 1. Medians of few steps (--quick: 2) under other load are noisy; use the full run for
figures to quote, and record the load average (printed and in the JSON).
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

ALL_METHODS = ("dense", "ddp-fp16", "ddp-powersgd", "dsq-int4:128", "dsq-sign", "dsq-topk:0.01",
               "dsq-topk:0.01+int4", "dsq-grouptopk:0.03+sign", "dsq-grouptopk:0.03+int4", "dsq-auto", "hvd-stock",
               "hvd-dsq-sign", "ds-stock", "ds-dsq-sign", "fsdp-stock", "fsdp-stock-reshard", "fsdp-dsq-int4:128",
               "fsdp-dsq-sign", "fsdp-dsq-int4:128-quantized", "fsdp-dsq-sign-quantized", "fsdp-dsq-auto",
               "ds-z2-stock", "ds-z2-dsq-sign", "ds-z2-dsq-auto", "ds-z3-stock", "ds-z3-dsq-sign", "ds-z3-dsq-auto",
               "hsdp-stock", "hsdp-dsq-int4:128", "hsdp-dsq-sign", "hsdp-dsq-int4:128-bf16", "hsdp-dsq-sign-bf16",
               "hsdp-dsq-auto")
DIAGNOSTIC_METHODS = ("ddp-hook", "dsq-dense")     # named only, not in the default run
RANKS_PER_NODE = 2          # the HSDP methods: ranks per "node" (host)
BASELINE = {"hvd-dsq-sign": "hvd-stock", "ds-dsq-sign": "ds-stock"}


def baseline_of(method: str):
    """The stock method a DoubleSqueeze method is compared with (None: dense DDP)."""
    if method.startswith("fsdp-dsq-"):
        return "fsdp-stock-reshard" if method.endswith("-quantized") else "fsdp-stock"
    if method.startswith("hsdp-dsq-"):
        return "hsdp-stock"
    if method.startswith("ds-z") and "-dsq-" in method:
        return method[:len("ds-zN")] + "-stock"
    return BASELINE.get(method)


def zero_method(method: str):
    """(ZeRO stage, compressor spec or None for stock) of a DeepSpeed method."""
    if method.startswith("ds-z"):
        stage, rest = int(method[len("ds-z")]), method[len("ds-zN-"):]
        return stage, (None if rest == "stock" else rest[len("dsq-"):])
    return 0, (None if method == "ds-stock" else method[len("ds-dsq-"):])
NEEDS_ROOT = ("cluster.py: needs root (it creates network namespaces, veth pairs, a bridge and tc qdiscs); "
              "run it as root")


def mlp_parameters(hidden: int) -> int:
    """Parameters of the benchmark's MLP 1024 -> hidden -> hidden -> 1000."""
    return 1024 * hidden + hidden + hidden * hidden + hidden + hidden * 1000 + 1000


def framework(method: str) -> str:
    for prefix in ("hvd", "ds", "fsdp", "hsdp"):
        if method.startswith(prefix + "-"):
            return prefix
    return "ddp"


# ----------------------------------------------------------------------------------------------------- workers
def _wait_file(path: Path, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end:
            raise TimeoutError(f"waited {timeout:.0f} s for {path}")
        time.sleep(0.02)


def _instrument(collective, acc: dict) -> None:
    """Time, on this instance only, the stages of the double pass (`begin`: compression and the uplink's launch;
    `serve`: the server pass, after waiting for the uplink; `end`: decoding, after waiting for the downlink), adding
    their wall seconds to acc["dsq_pass_s"] and the compression work in them (`RoundStats.compress_seconds`, no
    waiting) to acc["dsq_work_s"]. With DDP the hook runs `begin` and the communication thread the rest, while
    backward goes on: the pass overlaps backward, and can exceed nothing but the wire."""
    def timed(fn, work=False):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc["dsq_pass_s"] += time.perf_counter() - t
                if work:
                    acc["dsq_work_s"] += a[0].stats.compress_seconds
        return wrapper
    collective.begin = timed(collective.begin)
    collective.serve = timed(collective.serve)
    collective.end = timed(collective.end, work=True)


def ranks_on_host(method: str) -> int:
    """Ranks each host runs for `method`: RANKS_PER_NODE for HSDP (its nodes), else one."""
    return RANKS_PER_NODE if framework(method) == "hsdp" else 1


def _torch_setup(m: str, model, acc: dict):
    """A DDP, FSDP2 or HSDP method on `model` (the process group exists): (optimizer, forward_backward(x, y) -> the
    time backward starts, auto's tuner or None, DoubleSqueeze's FSDP2 state or None)."""
    import torch
    import torch.nn as nn
    tuner = fsdp_state = None
    if framework(m) == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # PowerSGD in one bucket: torch's powerSGD_hook waits on an allreduce inside a Gloo callback, and with two
        # buckets in flight both of Gloo's worker threads block there and the job deadlocks (seen here, torch 2.13)
        net = DDP(model, bucket_cap_mb=1024) if m == "ddp-powersgd" else DDP(model)
        if m in ("ddp-fp16", "ddp-hook"):
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
            net.register_comm_hook(None, default_hooks.fp16_compress_hook if m == "ddp-fp16" else
                                   default_hooks.allreduce_hook)
        elif m == "ddp-powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps
            state = ps.PowerSGDState(process_group=None, matrix_approximation_rank=2, start_powerSGD_iter=2,
                                     warm_start=True, use_error_feedback=True, min_compression_rate=2)
            net.register_comm_hook(state, ps.powerSGD_hook)
        elif m.startswith("dsq-"):
            import dsq_plugins as dsq
            config = (dsq.DoubleSqueezeConfig(warmup_steps=10 ** 9) if m == "dsq-dense" else
                      dsq.DoubleSqueezeConfig(compressor=m[len("dsq-"):]))
            state = dsq.DoubleSqueezeState(config)
            _instrument(state.collective, acc)
            net.register_comm_hook(state, dsq.doublesqueeze_hook)
            tuner = state.auto
    elif framework(m) == "hsdp":
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        nodes = dist.get_world_size() // RANKS_PER_NODE        # rank r is on node r // RANKS_PER_NODE
        mesh = init_device_mesh("cpu", (nodes, RANKS_PER_NODE), mesh_dim_names=("replicate", "shard"))
        stock = m == "hsdp-stock"
        on = mesh if stock else mesh["shard"]
        for layer in (model[0], model[2], model[4]):
            fully_shard(layer, mesh=on, reshard_after_forward=False)
        net = fully_shard(model, mesh=on, reshard_after_forward=False)
        if not stock:
            import dsq_plugins as dsq
            import dsq_plugins.fsdp as dsq_fsdp
            spec = m[len("hsdp-dsq-"):]
            narrow = spec.endswith("-bf16")
            fsdp_state = dsq_fsdp.install(model, dsq.DoubleSqueezeConfig(compressor=spec.replace("-bf16", ""),
                                                                         guard=0.0),
                                          replicate_group=mesh["replicate"].get_group(),
                                          residual_dtype=torch.bfloat16 if narrow else None)
            tuner = fsdp_state.auto
    else:
        from torch.distributed.fsdp import fully_shard

        reshard = m == "fsdp-stock-reshard" or m.endswith("-quantized")
        for layer in (model[0], model[2], model[4]):
            fully_shard(layer, reshard_after_forward=reshard)
        net = fully_shard(model, reshard_after_forward=False)
        if m.startswith("fsdp-dsq-"):
            import dsq_plugins as dsq
            import dsq_plugins.fsdp as dsq_fsdp
            spec = m[len("fsdp-dsq-"):].replace("-quantized", "")
            fsdp_state = dsq_fsdp.install(model, dsq.DoubleSqueezeConfig(compressor=spec, guard=0.0),
                                          downlink="quantized" if reshard else "delta")
            tuner = fsdp_state.auto
    opt = torch.optim.SGD(net.parameters(), lr=0.01)

    def forward_backward(x, y):
        loss = nn.functional.cross_entropy(net(x), y)
        t = time.perf_counter()
        loss.backward()
        return t
    return opt, forward_backward, tuner, fsdp_state


def worker(args) -> None:
    """One rank: build the model and the method's distributed wrapper, then run the phases."""
    import faulthandler

    import torch
    import torch.nn as nn
    from ddp_bytes import net_bytes

    faulthandler.register(signal.SIGUSR1)      # the parent asks for the stacks of a stalled job
    torch.set_num_threads(1)
    tuner = None
    h, m = args.hidden, args.method
    acc = {"dsq_pass_s": 0.0, "dsq_work_s": 0.0}

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(1024, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1000))
    model = mlp()
    pair = m.startswith("pair:")
    if pair:
        m = m[len("pair:"):]
    fw = framework(m)
    if fw in ("ddp", "fsdp", "hsdp"):
        import torch.distributed as dist
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        barrier = dist.barrier
        opt, forward_backward, tuner, fsdp_state = _torch_setup(m, model, acc)
        if pair:      # the baseline in the same job, on its own copy, stepped alternately with the method
            base_acc = {"dsq_pass_s": 0.0, "dsq_work_s": 0.0}
            base = _torch_setup(baseline_of(m) or "dense", mlp(), base_acc)
            if tuner is not None:     # auto's clock stops while the baseline steps: it times its own steps only
                paused, clock = [0.0], tuner.clock
                tuner.clock = lambda: clock() - paused[0]
    elif fw == "hvd":
        import horovod.torch as hvd

        import horovod_ext
        hvd.init()
        rank = hvd.rank()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        if m == "hvd-stock":
            opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
        else:           # switched on by dsq-horovodrun's --dsq-compressor (DSQ_HOROVOD_CONFIG)
            opt = horovod_ext.DistributedOptimizer(opt, named_parameters=model.named_parameters())
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)

        def barrier():
            hvd.allreduce(torch.zeros(1), name="cluster.barrier")

        def forward_backward(x, y):
            loss = nn.functional.cross_entropy(model(x), y)
            t = time.perf_counter()
            loss.backward()
            return t
    else:
        import torch.distributed as dist

        import deepspeed_ext
        stage, spec = zero_method(m)
        config = {"train_micro_batch_size_per_gpu": args.batch, "gradient_clipping": 0.0,
                  "steps_per_print": 10 ** 9, "zero_optimization": {"stage": stage},
                  "zero_allow_untested_optimizer": True}
        if stage == 2:
            config["zero_optimization"].update(overlap_comm=True, contiguous_gradients=True)
        if spec is not None:
            config["doublesqueeze"] = {"enabled": True, "compressor": spec, **({"guard": 0} if stage >= 2 else {})}
        engine, _, _, _ = deepspeed_ext.initialize(model=model, config=config,
                                                   optimizer=torch.optim.SGD(model.parameters(), lr=0.01))
        rank = engine.global_rank
        barrier = dist.barrier
        tuner = getattr(getattr(engine, "doublesqueeze", None), "auto", None)
        if getattr(engine, "doublesqueeze", None) is not None and stage < 2:
            _instrument(engine.doublesqueeze, acc)

        class _Opt:
            zero_grad = staticmethod(lambda: None)
            step = staticmethod(engine.step)
        opt = _Opt()

        def forward_backward(x, y):
            loss = nn.functional.cross_entropy(engine(x), y)
            t = time.perf_counter()
            engine.backward(loss)
            return t

    gen = torch.Generator().manual_seed(1000 + rank)

    base_s = []        # pair: the baseline's step seconds, one per step of the method
    order = [False]

    def timed(opt, forward_backward, acc, x, y):
        """One training step; returns (forward, backward, optimizer, double pass, its collectives) seconds."""
        acc.update(dsq_pass_s=0.0, dsq_work_s=0.0)
        t0 = time.perf_counter()
        opt.zero_grad()
        t1 = forward_backward(x, y)
        t2 = time.perf_counter()
        opt.step()
        return (t1 - t0, t2 - t1, time.perf_counter() - t2, acc["dsq_pass_s"],
                acc["dsq_pass_s"] - acc["dsq_work_s"])

    def step():
        """One step of the method (pair: and one of the baseline on the same batch, before it at one step and
        after it at the next, so that neither always runs second); returns `timed`'s figures of the method."""
        x, y = torch.randn(args.batch, 1024, generator=gen), torch.randint(0, 1000, (args.batch,), generator=gen)
        if not pair:
            return timed(opt, forward_backward, acc, x, y)
        order[0] = not order[0]
        if order[0]:
            base_step(x, y)
        r = timed(opt, forward_backward, acc, x, y)
        if not order[0]:
            base_step(x, y)
        return r

    def base_step(x, y):
        base_s.append(sum(timed(base[0], base[1], base_acc, x, y)[:3]))
        if tuner is not None:          # before the method's next step reads auto's clock
            paused[0] += base_s[-1]

    run = Path(args.rundir)
    for _ in range(args.warmup):
        step()
    out = {"rank": rank, "host": int(os.environ.get("DSQ_CLUSTER_HOST", rank)), "phases": {}}
    if m.startswith("ds-z") and getattr(engine, "doublesqueeze", None) is not None:    # what DoubleSqueeze keeps
        out["memory"] = {f"dsq_{k}": v for k, v in engine.doublesqueeze.memory_report().items()}
    if fw in ("fsdp", "hsdp"):     # persistent bytes per rank: FSDP's shards (parameters, gradients), what install adds
        local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
        out["memory"] = {"param_shards": local, "grad_shards": local,
                         **({f"dsq_{k}": v for k, v in fsdp_state.memory_report().items()} if fsdp_state else {})}
    for k, phase in enumerate(args.phases.split(",")):
        barrier()
        if rank == 0:
            (run / f"ready-{k}").touch()
        _wait_file(run / f"go-{k}", args.phase_timeout)
        barrier()
        base_s.clear()
        adapt = [sum(step()[:3]) for _ in range(args.adapt_steps if tuner is not None else 0)]
        adapt_base = list(base_s)
        base_s.clear()
        tx0, rx0 = net_bytes("eth0")
        parts = [step() for _ in range(args.steps)]
        barrier()
        tx1, rx1 = net_bytes("eth0")
        out["phases"][phase] = {"step_s": [sum(p[:3]) for p in parts], "dsq_pass_s": [p[3] for p in parts],
                                "dsq_comm_s": [p[4] for p in parts], "forward_s": [p[0] for p in parts],
                                "backward_s": [p[1] for p in parts], "optimizer_s": [p[2] for p in parts],
                                "tx_bytes": tx1 - tx0, "rx_bytes": rx1 - rx0, "adapt_step_s": adapt}
        if pair:
            out["phases"][phase].update(base_step_s=list(base_s), adapt_base_step_s=adapt_base)
        if tuner is not None:
            out["phases"][phase].update(auto_mode=tuner.mode, auto_times=dict(tuner.times),
                                        auto_history=list(tuner.history))
    (run / f"rank{rank}.json").write_text(json.dumps(out))
    barrier()
    sys.stdout.flush()
    os._exit(0)         # no interpreter finalisation with Gloo threads alive (see tests/checks.py)


# ------------------------------------------------------------------------------------------------------ parent
class Runner:
    """Runs the jobs on a `netns.Cluster`, one method at a time, and kills what it started on the way out."""

    def __init__(self, cluster, args, base: Path):
        self.cl, self.args, self.base = cluster, args, base
        self.procs = []
        self.bin = base / "bin"
        self.bin.mkdir()
        cases = "\n".join(f"    {ip}) ns={ns} ;;" for ip, ns in zip(cluster.addresses, cluster.namespaces))
        (self.bin / "ssh").write_text(f"""#!/bin/sh
# horovodrun's ssh, on the cluster of benchmarks/cluster.py: ssh [-o OPT]... HOST [-p P] [-i F] [-o OPT] COMMAND
while [ $# -gt 0 ]; do case "$1" in -o|-p|-i) shift 2 ;; -*) shift ;; *) break ;; esac; done
host=$1; shift
while [ $# -gt 0 ]; do case "$1" in -o|-p|-i) shift 2 ;; *) break ;; esac; done
case "$host" in
{cases}
    *) echo "cluster ssh: unknown host $host" >&2; exit 255 ;;
esac
exec ip netns exec "$ns" sh -c "$*"
""")
        (self.bin / "ssh").chmod(0o755)

    def _env(self, **extra):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]),
                   PATH=os.pathsep.join([str(self.bin), str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
        env.pop("DSQ_HOROVOD_CONFIG", None)
        # DeepSpeed JIT-builds its CPU shm op into TORCH_EXTENSIONS_DIR; a private folder, because a build with
        # other flags elsewhere (seen: the test suite's) makes each side rebuild it (about a minute) in turn
        env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/doublesqueeze/torch_extensions_cluster"))
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def _worker_args(self, method, rundir, phases):
        a = self.args
        return [sys.executable, str(Path(__file__).resolve()), "--worker", "--method", method, "--rundir", str(rundir),
                "--phases", ",".join(phases), "--steps", str(a.steps), "--warmup", str(a.warmup), "--hidden",
                str(a.hidden), "--batch", str(a.batch), "--phase-timeout", str(a.phase_timeout),
                "--adapt-steps", str(a.adapt_steps)]

    def _launch(self, method, rundir, phases, log):
        cl, n = self.cl, self.args.hosts
        if framework(method) == "hvd":
            hosts = ",".join(f"{ip}:1" for ip in cl.addresses)
            bindir = Path(sys.executable).parent
            launcher = [str(bindir / "dsq-horovodrun"), "--dsq-compressor", method[len("hvd-dsq-"):]] \
                if method != "hvd-stock" else [str(bindir / "horovodrun")]
            cmd = cl.exec_prefix(0) + launcher + ["--gloo", "-np", str(n), "-H", hosts, "--network-interface",
                                                   cl.ifname, "--disable-cache", "--start-timeout", "120",
                                                   *self._worker_args(method, rundir, phases)]
            return [subprocess.Popen(cmd, cwd=ROOT, env=self._env(), stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)]
        procs = []
        per = ranks_on_host(method)
        for r in range(n):
            env = self._env(RANK=r, WORLD_SIZE=n, LOCAL_RANK=r % per, LOCAL_WORLD_SIZE=per, DSQ_CLUSTER_HOST=r // per,
                            MASTER_ADDR=cl.addresses[0], MASTER_PORT=29555, GLOO_SOCKET_IFNAME=cl.ifname)
            procs.append(subprocess.Popen(cl.exec_prefix(r // per) + self._worker_args(method, rundir, phases),
                                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        return procs

    def _pids(self):
        pids = set()
        for ns in self.cl.namespaces:
            got = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            pids |= {int(x) for x in got.stdout.split()}
        return pids

    def signal_workers(self, signum) -> None:
        """Send `signum` to the Python processes in this run's namespaces."""
        for pid in self._pids():
            try:
                if b"--worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signum)
            except OSError:
                pass

    def kill_all(self) -> None:
        """Kill the processes this run started: its launchers, and whatever still runs in its namespaces."""
        pids = {p.pid for p in self.procs if p.poll() is None} | self._pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.procs = []

    def run(self, method: str, bandwidths):
        """One job: returns the per-rank phase records, or raises RuntimeError with the job's log tail."""
        rundir = Path(tempfile.mkdtemp(prefix=f"{method.replace(':', '_')}-", dir=self.base))
        phases = ["unshaped"] + list(bandwidths)
        self.cl.shape(None)
        with open(rundir / "log.txt", "w") as log:
            self.procs = self._launch(method, rundir, phases, log)
            try:
                for k, phase in enumerate(phases):
                    end = time.monotonic() + self.args.phase_timeout
                    while not (rundir / f"ready-{k}").exists():
                        if any(p.poll() is not None for p in self.procs) or time.monotonic() > end:
                            raise RuntimeError(f"{method}: the job stopped or stalled before phase {phase}")
                        time.sleep(0.05)
                    self.cl.shape(None if phase == "unshaped" else phase)
                    (rundir / f"go-{k}").touch()
                end = time.monotonic() + self.args.phase_timeout
                for p in self.procs:
                    p.wait(timeout=max(1.0, end - time.monotonic()))
                ranks = [json.loads((rundir / f"rank{r}.json").read_text()) for r in range(self.args.hosts)]
            except (RuntimeError, subprocess.TimeoutExpired, FileNotFoundError) as e:
                self.signal_workers(signal.SIGUSR1)       # stacks into the log
                time.sleep(1.0)
                self.kill_all()
                log.flush()
                raise RuntimeError(f"{e}\n--- log tail\n{(rundir / 'log.txt').read_text()[-4000:]}") from None
            finally:
                self.cl.shape(None)
        self.procs = []
        return ranks

    def probe(self, rate: str, seconds: float = 1.0) -> dict:
        """A TCP stream host 0 -> host 1 for about `seconds` at `rate`: goodput and counted bytes per second."""
        server = ("import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                  "s.bind(('0.0.0.0', 29556)); s.listen(1); print('up', flush=True); c, _ = s.accept()\n"
                  "while c.recv(1 << 20): pass\nc.close()")
        client = ("import socket, sys, time\nc = socket.create_connection((sys.argv[1], 29556)); b = bytes(1 << 20)\n"
                  "n = int(sys.argv[2]); t = time.perf_counter()\nfor _ in range(n): c.sendall(b)\n"
                  "c.shutdown(socket.SHUT_WR); c.recv(1); print(time.perf_counter() - t)")
        from netns import parse_rate
        mib = max(2, int(parse_rate(rate) / 8 * seconds / 2 ** 20))
        self.cl.shape(rate)
        try:
            srv = subprocess.Popen(self.cl.exec_prefix(1) + [sys.executable, "-c", server], stdout=subprocess.PIPE,
                                   text=True)
            self.procs = [srv]
            srv.stdout.readline()
            before = self.cl.counters(0)["tx"]
            out = subprocess.run(self.cl.exec_prefix(0) + [sys.executable, "-c", client, self.cl.addresses[1],
                                                           str(mib)], capture_output=True, text=True, check=True)
            srv.wait(timeout=30)
            seconds = float(out.stdout.split()[-1])
            counted = self.cl.counters(0)["tx"] - before
        finally:
            self.cl.shape(None)
            self.kill_all()
        return {"nominal_bps": parse_rate(rate), "goodput_Bps": mib * 2 ** 20 / seconds,
                "counted_Bps": counted / seconds, "seconds": seconds}


MEMORY = {}      # method -> rank 0's persistent bytes (FSDP2 methods)


def paired(method_s, base_s) -> dict:
    """A pair method's figures: per step the ratio of the method's time to the baseline's (both the slowest rank's,
    on the same batch, one right after the other), its median with a distribution-free 95% interval (order
    statistics of the binomial: no assumption about the noise), its quartiles, and the ratio of the sums."""
    ratios = sorted(a / b for a, b in zip(method_s, base_s))
    n = len(ratios)
    k = max(0, int(n / 2 - 0.98 * n ** 0.5))          # P(Binomial(n, 1/2) < k) about 2.5%
    q = statistics.quantiles(ratios, n=4) if n > 1 else ratios * 3
    return {"base_step_time_s": statistics.median(base_s), "base_step_times_s": list(base_s),
            "ratios": ratios, "ratio_median": statistics.median(ratios), "ratio_ci95": [ratios[k], ratios[n - 1 - k]],
            "ratio_quartiles": [q[0], q[2]], "ratio_of_sums": sum(method_s) / sum(base_s)}


def summarise(ranks, steps: int, method: str = "") -> dict:
    """Per phase: median step (slowest rank per step), parts (rank 0's medians), bytes per step."""
    if "memory" in ranks[0]:
        MEMORY[method] = ranks[0]["memory"]
    out = {}
    for phase in ranks[0]["phases"]:
        per = [r["phases"][phase] for r in ranks]
        # one rank per host counts the host's interface (HSDP: a node's ranks share it)
        hosts = [r["phases"][phase] for k, r in enumerate(ranks) if r.get("host", k) not in
                 {q.get("host", j) for j, q in enumerate(ranks[:k])}]
        slowest = [max(p["step_s"][i] for p in per) for i in range(steps)]
        out[phase] = {
            "step_time_s": statistics.median(slowest), "step_times_s": slowest,
            "forward_s": statistics.median(per[0]["forward_s"]), "backward_s": statistics.median(per[0]["backward_s"]),
            "optimizer_s": statistics.median(per[0]["optimizer_s"]),
            "dsq_pass_s": statistics.median(per[0]["dsq_pass_s"]),
            "dsq_comm_s": statistics.median(per[0]["dsq_comm_s"]),
            "bytes_per_step_all_hosts": sum(p["tx_bytes"] for p in hosts) / steps,
            "bytes_per_step_per_rank": max(max(p["tx_bytes"], p["rx_bytes"]) for p in hosts) / steps,
            "tx_bytes_per_rank": [p["tx_bytes"] for p in per], "rx_bytes_per_rank": [p["rx_bytes"] for p in per]}
        if "base_step_s" in per[0]:
            out[phase].update(paired(slowest, [max(p["base_step_s"][i] for p in per) for i in range(steps)]))
        adapt = per[0].get("adapt_step_s") or []
        if adapt and "adapt_base_step_s" in per[0]:
            base = [max(p["adapt_base_step_s"][i] for p in per) for i in range(len(adapt))]
            slow = [max(p["adapt_step_s"][i] for p in per) for i in range(len(adapt))]
            out[phase]["adapt_ratio_of_sums"] = sum(slow) / sum(base)
        if adapt:
            slow = [max(p["adapt_step_s"][i] for p in per) for i in range(len(adapt))]
            out[phase].update(adapt_steps=len(slow), adapt_mean_step_s=statistics.mean(slow),
                              auto_mode=per[0]["auto_mode"], auto_times=per[0]["auto_times"],
                              auto_history=per[0]["auto_history"])
    return out


def report(results, bandwidths, probes, args) -> dict:
    """Prints the tables; returns the JSON document."""
    doc = {"hosts": args.hosts, "parameters": mlp_parameters(args.hidden), "hidden": args.hidden, "batch": args.batch,
           "steps": args.steps, "warmup": args.warmup, "bandwidths": list(bandwidths), "probes": probes,
           "load_average": os.getloadavg(), "methods": {}, "by_bandwidth": {}, "errors": {}}
    for m, r in results.items():
        if isinstance(r, str):
            doc["errors"][m] = r
        else:
            doc["methods"][m] = r
    ok = {m: r for m, r in doc["methods"].items() if not m.startswith("pair:")}
    compute = {m: r["unshaped"]["step_time_s"] for m, r in ok.items()}
    nodes = (f" (the hsdp methods: {args.hosts // RANKS_PER_NODE} nodes x {RANKS_PER_NODE} ranks, bytes per node)"
             if any(framework(m) == "hsdp" for m in ok) else "")
    print(f"\n{args.hosts} hosts x 1 rank{nodes}, MLP 1024-{args.hidden}-{args.hidden}-1000 "
          f"({mlp_parameters(args.hidden) / 1e6:.1f}M parameters), batch {args.batch}, {args.steps} steps per "
          f"phase after {args.warmup} warm-up; load average {os.getloadavg()[0]:.2f}")
    print("compute = the same job's median step on the unshaped link (forward, backward, compression, optimizer; "
          "no shaped wire);\nfloor = compute + bytes per rank / effective bandwidth; bytes counted by the kernel "
          "on each host's interface")
    for bw in bandwidths:
        eff = probes[bw]["counted_Bps"]
        print(f"\n== {bw}: effective {eff * 8 / 1e6:.0f} Mbit/s (TCP stream, counted bytes; goodput "
              f"{probes[bw]['goodput_Bps'] * 8 / 1e6:.0f} Mbit/s)")
        print(f"{'method':>14} {'s/step':>8} {'speed-up':>9} {'MB/step':>9} {'MB/rank':>8} {'fewer B':>8} "
              f"{'compute':>8} {'floor':>7} {'vs floor':>8}  {'vs own stock':>12}")
        rows = {}
        for m, r in ok.items():
            p = r[bw]
            row = {"step_time_s": p["step_time_s"], "bytes_per_step_all_hosts": p["bytes_per_step_all_hosts"],
                   "bytes_per_step_per_rank": p["bytes_per_step_per_rank"], "compute_s": compute[m],
                   "floor_s": compute[m] + p["bytes_per_step_per_rank"] / eff,
                   "forward_s": p["forward_s"], "backward_s": p["backward_s"], "optimizer_s": p["optimizer_s"]}
            row["ratio_to_floor"] = row["step_time_s"] / row["floor_s"]
            for base_key, base in (("dense", "dense"), ("own", baseline_of(m))):
                b = ok.get(base, {}).get(bw) if base else None
                row[f"speedup_vs_{base_key}"] = b["step_time_s"] / p["step_time_s"] if b else None
                row[f"bytes_fewer_vs_{base_key}"] = (b["bytes_per_step_per_rank"] / p["bytes_per_step_per_rank"]
                                                     if b else None)
            rows[m] = row
            f = lambda x, fmt: format(x, fmt) if x is not None else "-"  # noqa: E731
            own = (f"{row['speedup_vs_own']:.2f}x t {row['bytes_fewer_vs_own']:.0f}x B"
                   if row["speedup_vs_own"] else "")
            print(f"{m:>14} {row['step_time_s']:>8.3f} {f(row['speedup_vs_dense'], '.2f'):>8}x "
                  f"{row['bytes_per_step_all_hosts'] / 1e6:>9.2f} {row['bytes_per_step_per_rank'] / 1e6:>8.2f} "
                  f"{f(row['bytes_fewer_vs_dense'], '.1f'):>7}x {row['compute_s']:>8.3f} {row['floor_s']:>7.3f} "
                  f"{row['ratio_to_floor']:>8.2f}  {own:>12}")
        doc["by_bandwidth"][bw] = {"effective_bps": eff * 8, "rows": rows,
                                   "step_time_s": {m: x["step_time_s"] for m, x in rows.items()}}
    first = bandwidths[0]
    doc["step_time_s"] = doc["by_bandwidth"][first]["step_time_s"] if first in doc["by_bandwidth"] else {}
    doc["bytes_per_step_per_rank"] = {m: x["bytes_per_step_per_rank"]
                                      for m, x in doc["by_bandwidth"].get(first, {}).get("rows", {}).items()}

    print("\nbreak-even bandwidth (DoubleSqueeze faster below it): B = (bytes_dense - bytes_dsq) / "
          "(compute_dsq - compute_dense), per rank, bytes at the first bandwidth")
    doc["break_even"] = {}
    for m in ok:
        base = (baseline_of(m) or "dense") if "dsq" in m else None
        if not base or base not in ok:
            continue
        db = ok[base][first]["bytes_per_step_per_rank"] - ok[m][first]["bytes_per_step_per_rank"]
        dc = compute[m] - compute[base]
        bps = db * 8 / dc if dc > 0 else float("inf")
        wins = {bw: ("dsq" if ok[m][bw]["step_time_s"] < ok[base][bw]["step_time_s"] else base) for bw in bandwidths}
        doc["break_even"][m] = {"baseline": base, "bits_per_s": bps, "bytes_saved_per_rank": db,
                                "extra_compute_s": dc, "measured_winner": wins}
        say = "any bandwidth (no extra compute)" if bps == float("inf") else f"{bps / 1e9:.2f} Gbit/s"
        print(f"  {m:>14} vs {base:<9}: {say:>20}  (saves {db / 1e6:.1f} MB/rank/step, costs {dc * 1e3:+.0f} ms "
              f"compute); measured winner: " + ", ".join(f"{bw} {w}" for bw, w in wins.items()))
    print(f"\nwhere the time goes at {first} and unshaped (rank 0, medians, seconds): fwd/bwd/opt = forward, "
          "backward (DDP and DeepSpeed communicate in it), optimizer step (Horovod waits for its collectives in "
          "it);\npass = the wall time of DoubleSqueeze's stages (compression, error feedback, both collectives; "
          "with DDP partly on the communication thread, overlapping backward), comm = the part of it spent waiting "
          "for the collectives; pass - comm = compression work (DDP, DeepSpeed)")
    print(f"{'method':>14} {'phase':>9} {'step':>7} {'fwd':>6} {'bwd':>6} {'opt':>6} {'pass':>6} {'comm':>6} "
          f"{'pass-comm':>9}")
    for m, r in ok.items():
        for ph in ("unshaped", first):
            p = r[ph]
            extra = (f"{p['dsq_pass_s']:>6.3f} {p['dsq_comm_s']:>6.3f} {p['dsq_pass_s'] - p['dsq_comm_s']:>9.3f}"
                     if p["dsq_pass_s"] else "")
            print(f"{m:>14} {ph:>9} {p['step_time_s']:>7.3f} {p['forward_s']:>6.3f} {p['backward_s']:>6.3f} "
                  f"{p['optimizer_s']:>6.3f} {extra}")
    auto = ok.get("dsq-auto")
    if auto:
        print("\ndsq-auto per phase: its mode at the end of the adaptation steps, the mean step over them (its "
              "explorations included), the step times it measured")
        for ph, p in auto.items():
            if "auto_mode" in p:
                times = ", ".join(f"{k} {v:.3f}" for k, v in p["auto_times"].items())
                print(f"  {ph:>9}: {p['auto_mode']:<16} adapt {p['adapt_steps']} steps, mean "
                      f"{p['adapt_mean_step_s']:.3f} s; measured {times}")
    pairs = {m: r for m, r in doc["methods"].items() if m.startswith("pair:")}
    if pairs:
        print("\npaired: the method and its baseline stepped alternately in one job on the same batches (auto's clock "
              "stops while the baseline steps);\nratio = the method's step / the baseline's, each the slowest rank's; "
              "median, its 95% interval, quartiles; sum = ratio of the sums")
        for m, r in pairs.items():
            base = baseline_of(m[len("pair:"):]) or "dense"
            for ph, p in r.items():
                adapt = (f"; adaptation steps {p['adapt_steps']}: sum ratio {p['adapt_ratio_of_sums']:.3f}, mode "
                         f"{p['auto_mode']}" if "adapt_ratio_of_sums" in p else "")
                print(f"  {m} vs {base}, {ph}: {p['step_time_s']:.3f} s against {p['base_step_time_s']:.3f}; ratio "
                      f"median {p['ratio_median']:.3f} (95% {p['ratio_ci95'][0]:.3f}-{p['ratio_ci95'][1]:.3f}, "
                      f"quartiles {p['ratio_quartiles'][0]:.3f}-{p['ratio_quartiles'][1]:.3f}), sum "
                      f"{p['ratio_of_sums']:.3f}, n {len(p['ratios'])}{adapt}")
    if MEMORY:
        doc["memory_per_rank"] = dict(MEMORY)
        print("\npersistent memory per rank (MB): FSDP2's parameter and gradient shards, and what DoubleSqueeze adds")
        for m, mem in MEMORY.items():
            print(f"  {m:>28}: " + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in mem.items()))
    doc["targets"] = targets(doc, bandwidths)
    for line in doc["targets"].get("lines", []):
        print(line)
    for m, e in doc["errors"].items():
        print(f"\n{m} FAILED: {e.splitlines()[0]}")
    return doc


def targets(doc, bandwidths) -> dict:
    """The figures of the 'compression that always pays' targets, where the run has what they need."""
    out, lines = {}, ["\ntargets (step time ratios, this run):"]
    dense_compute = doc["methods"].get("dense", {}).get("unshaped", {}).get("step_time_s")
    for bw in bandwidths:
        st = doc["by_bandwidth"].get(bw, {}).get("step_time_s", {})
        dsq = {m: t for m, t in st.items() if m.startswith("dsq-")}
        if not dsq or not dense_compute:
            continue
        best = min(dsq, key=dsq.get)
        row = {"best_dsq": best, "best_dsq_s": dsq[best], "vs_dense_compute": dsq[best] / dense_compute}
        text = f"  {bw}: best DoubleSqueeze {best} {dsq[best]:.3f} s = {row['vs_dense_compute']:.2f}x dense's " \
               f"unshaped step ({dense_compute:.3f} s)"
        if "ddp-powersgd" in st:
            row["powersgd_over_best"] = st["ddp-powersgd"] / dsq[best]
            text += f"; PowerSGD {st['ddp-powersgd']:.3f} s = {row['powersgd_over_best']:.2f}x slower"
        if "dsq-auto" in st and "dense" in st:
            row["auto_over_dense"] = st["dsq-auto"] / st["dense"]
            text += f"; auto {st['dsq-auto']:.3f} s = {row['auto_over_dense']:.2f}x dense ({st['dense']:.3f} s)"
        out[bw] = row
        lines.append(text)
    for bw in bandwidths:
        st = doc["by_bandwidth"].get(bw, {}).get("step_time_s", {})
        for m, t in st.items():
            base = baseline_of(m) if m.startswith(("fsdp-dsq-", "hsdp-dsq-", "ds-z")) else None
            if base in st:
                out.setdefault(bw, {})[f"{m}_speedup_vs_{base}"] = st[base] / t
                lines.append(f"  {bw}: {m} {t:.3f} s = {st[base] / t:.2f}x faster than {base} ({st[base]:.3f} s)")
    for m, r in doc["methods"].items():
        base = baseline_of(m[len("pair:"):]) or "dense"
        for bw in bandwidths if m.startswith("pair:") else ():
            p = r.get(bw, {})
            if "ratio_median" in p:
                out.setdefault(bw, {})[f"{m}_ratio_median"] = p["ratio_median"]
                lines.append(f"  {bw}: {m[len('pair:'):]} / {base}, paired per step: median {p['ratio_median']:.3f} "
                             f"(95% {p['ratio_ci95'][0]:.3f}-{p['ratio_ci95'][1]:.3f})")
    out["lines"] = lines
    return out


def plot(doc, path) -> None:
    """Step time against the effective bandwidth, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bws = [bw for bw in doc["bandwidths"] if bw in doc["by_bandwidth"]]
    xs = [doc["by_bandwidth"][bw]["effective_bps"] / 1e6 for bw in bws]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for m in (m for m in doc["methods"] if not m.startswith("pair:")):
        ys = [doc["by_bandwidth"][bw]["step_time_s"].get(m) for bw in bws]
        style = "-o" if m.startswith("dsq-") else "--s"
        ax.plot(xs, ys, style, label=m, linewidth=2.2 if m == "dsq-auto" else 1.2)
    compute = doc["methods"].get("dense", {}).get("unshaped", {}).get("step_time_s")
    if compute:
        ax.axhline(compute, color="grey", linestyle=":", label="dense, unshaped (compute)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(xs, [f"{bw}\n({x:.0f} Mbit/s)" for bw, x in zip(bws, xs)])
    ax.set_xlabel("link per host (tc rate; effective TCP rate measured)")
    ax.set_ylabel("seconds per step (median, slowest rank)")
    ax.set_title(f"{doc['hosts']} hosts, {doc['parameters'] / 1e6:.1f}M-parameter MLP")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=4, help="hosts (namespaces), one rank each")
    ap.add_argument("--methods", default=",".join(ALL_METHODS))
    ap.add_argument("--bandwidth", default=None,
                    help="comma-separated tc rates, e.g. 100mbit,1gbit,10gbit (default 100mbit,1gbit,10gbit; "
                         "--quick: 100mbit)")
    ap.add_argument("--steps", type=int, default=None, help="measured steps per phase (default 8; --quick: 2)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="unmeasured steps first, unshaped (default 3; --quick: 2; PowerSGD compresses from step 2)")
    ap.add_argument("--hidden", type=int, default=4096, help="MLP width (4096: 25.2M parameters)")
    ap.add_argument("--batch", type=int, default=32, help="samples per rank per step")
    ap.add_argument("--quick", action="store_true", help="fewer steps, 100mbit only unless --bandwidth is given")
    ap.add_argument("--phase-timeout", type=float, default=900.0, help="seconds a phase may take")
    ap.add_argument("--adapt-steps", type=int, default=40,
                    help="dsq-auto: steps at the start of each phase before the measured ones (it notices the new "
                         "link and explores)")
    ap.add_argument("--png", default=None, help="plot step time against bandwidth, every method, to this file")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="", help=argparse.SUPPRESS)
    ap.add_argument("--rundir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--phases", default="", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if os.geteuid() != 0:
        print(NEEDS_ROOT, file=sys.stderr)
        return 2
    missing = [t for t in ("ip", "tc") if not shutil.which(t)]
    if missing:
        print(f"cluster.py: needs the {' and '.join(missing)} command(s) (iproute2)", file=sys.stderr)
        return 2
    from netns import Cluster, parse_rate, remove_stale
    bandwidths = [b.strip() for b in (args.bandwidth or ("100mbit" if args.quick else "100mbit,1gbit,10gbit"))
                  .split(",") if b.strip()]
    for b in bandwidths:
        try:
            parse_rate(b)
        except ValueError as e:
            ap.error(str(e))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    valid = ALL_METHODS + DIAGNOSTIC_METHODS
    bad = [m for m in methods if m not in valid and not (
        m.startswith("pair:") and m[len("pair:"):] in valid and ("dsq" in m or m == "pair:ddp-hook")
        and framework(m[len("pair:"):]) in ("ddp", "fsdp", "hsdp"))]
    if bad:
        ap.error(f"unknown method(s) {', '.join(bad)}; valid: {', '.join(valid)}, and pair:M for a DDP, "
                 f"FSDP2 or HSDP DoubleSqueeze method M or ddp-hook")
    if args.steps is None:
        args.steps = 2 if args.quick else 8
    if args.warmup is None:
        args.warmup = 2 if args.quick else 3
    if args.hosts < 2:
        ap.error("--hosts must be at least 2")
    if any(framework(m) == "hsdp" for m in methods) and (args.hosts < 2 * RANKS_PER_NODE
                                                          or args.hosts % RANKS_PER_NODE):
        ap.error(f"the hsdp methods run nodes of {RANKS_PER_NODE} ranks, at least two nodes: --hosts must be a "
                 f"multiple of {RANKS_PER_NODE}, at least {2 * RANKS_PER_NODE}")

    t_start = time.monotonic()
    stale = remove_stale()
    if stale:
        print(f"removed a stale cluster left by a killed run: {' '.join(stale)}", flush=True)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

    base = Path(tempfile.mkdtemp(prefix="dsq-cluster-"))
    cluster = Cluster(args.hosts)
    runner = None
    try:
        cluster.create()
        runner = Runner(cluster, args, base)
        probes = {}
        for bw in bandwidths:
            probes[bw] = runner.probe(bw)
            print(f"link {bw}: TCP stream {probes[bw]['goodput_Bps'] * 8 / 1e6:.0f} Mbit/s goodput, "
                  f"{probes[bw]['counted_Bps'] * 8 / 1e6:.0f} Mbit/s counted", flush=True)
        results = {}
        for m in methods:
            t0 = time.monotonic()
            try:
                results[m] = summarise(runner.run(m, bandwidths), args.steps, m)
                print(f"{m}: " + ", ".join(f"{ph} {r['step_time_s']:.3f} s/step" for ph, r in results[m].items())
                      + f"  ({time.monotonic() - t0:.0f} s)", flush=True)
            except RuntimeError as e:
                results[m] = str(e)
                print(f"{m}: FAILED ({time.monotonic() - t0:.0f} s)\n{e}", flush=True)
    finally:
        if runner:
            runner.kill_all()
        cluster.close()
        shutil.rmtree(base, ignore_errors=True)
    doc = report(results, bandwidths, probes, args)
    doc["wall_time_s"] = time.monotonic() - t_start
    print(f"\nwall time {doc['wall_time_s']:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2))
    if args.png:
        plot(doc, args.png)
    return 1 if doc["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
