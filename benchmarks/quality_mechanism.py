"""Why a compressor trains the transformer LM worse than dense: the experiments behind docs/RESULTS.md section 7.

In one process, two workers (each its own batches of `benchmarks/real_models.py`'s LM) and the double pass written
out in plain torch (worker: ``c_i = C(g_i + e_i)``, server: ``C(mean c_i + e)``), so that compressors and
optimizers the engine does not ship can be tried side by side with those it does. Per tensor it reports the
fraction of the compressed input's energy each pass keeps (``delta``, the quality guard's measure) and the
residual against the gradient.

    python benchmarks/quality_mechanism.py --spec sign --diag          # the default of old: blocks of 4096
    python benchmarks/quality_mechanism.py --spec sign:128             # a scale per 128 elements
    python benchmarks/quality_mechanism.py --spec int4:128             # the new default
    python benchmarks/quality_mechanism.py --spec rowcol               # sign with a scale per row and column
    python benchmarks/quality_mechanism.py --spec none --noise 0.5     # dense + 50% Gaussian noise, no compression
    python benchmarks/quality_mechanism.py --spec none --adam frozen:60   # AdamW, variance frozen at step 60
    python benchmarks/quality_mechanism.py --spec sign --opt sgd       # SGD + momentum 0.9, lr 0.3
    # docs/RESULTS.md section 9: whitened ternary at 16x, its residual released over 8 steps
    python benchmarks/quality_mechanism.py --spec tern:512 --whiten 0.999 --warm 5:int4:128 --release 8

Specs: ``none``, ``sign[:C]`` (a scale ``mean|v|`` per C elements, default 4096), ``int8|int4|int2[:C]`` (min-max
per C, default 512), ``rowcol`` (sign with the scale ``a_i * b_j`` of the matrix's row and column means of
``|v|``, fitted by least squares; other tensors as ``sign``), ``tern[:C]`` (ternary: 0 below 0.612 of the chunk's
RMS, else the sign times the mean ``|v|`` of the kept values; 1.6 bits packed five to a byte, default C 512),
``lm2[:C]`` (the 4-level Lloyd-Max quantiser of a Gaussian, in units of the chunk's RMS), ``sr2|sr3[:C[@K]]``
(unbiased: stochastic rounding onto 4 or 3 levels spanning +-K RMS of the chunk, default K 2.5). Tensors under
1024 elements travel dense.

Study options (none is in the engine): ``--whiten BETA`` compresses ``v / d`` and sends ``d * C(v / d)``, ``d`` the
per-coordinate RMS of the applied update (an EMA with BETA, the same on every rank since every rank applies the
same update); ``--release K`` feeds a residual back a K-th at a time (``v = g + e / K``, ``e <- e + g - c``: the
conservation law still holds, and the noise it puts in the update is about that of no error feedback);
``--noise-whitened S`` adds Gaussian noise of S times each coordinate's RMS to the dense mean gradient;
``--moment m-dense|v-dense`` feeds AdamW's first or second moment from the dense mean gradient instead of the
compressed one.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_models import Task  # noqa: E402


def sign_chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    n, pad = x.numel(), (-x.numel()) % chunk
    v = torch.cat([x, x.new_zeros(pad)]).view(-1, chunk)
    count = torch.full((v.shape[0],), float(chunk))
    count[-1] = chunk - pad
    scale = v.abs().sum(1) / count
    return (torch.where(v >= 0, 1.0, -1.0) * scale[:, None]).reshape(-1)[:n]


def int_chunks(x: torch.Tensor, bits: int, chunk: int) -> torch.Tensor:
    n, pad = x.numel(), (-x.numel()) % chunk
    v = torch.cat([x, x.new_full((pad,), float("nan"))]).view(-1, chunk)
    lo = v.nan_to_num(nan=math.inf).amin(1, keepdim=True)
    hi = v.nan_to_num(nan=-math.inf).amax(1, keepdim=True)
    step = (hi - lo) / (2 ** bits - 1)
    q = ((v - lo) / torch.where(step > 0, step, 1.0)).round().clamp(0, 2 ** bits - 1)
    return (q * step + lo).reshape(-1)[:n]


def _chunk_rms(x: torch.Tensor, chunk: int):
    n, pad = x.numel(), (-x.numel()) % chunk
    v = torch.cat([x, x.new_zeros(pad)]).view(-1, chunk)
    count = torch.full((v.shape[0], 1), float(chunk))
    count[-1] = chunk - pad
    return v, (v.square().sum(1, keepdim=True) / count).sqrt(), n


def ternary_chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    v, rms, n = _chunk_rms(x, chunk)
    keep = v.abs() > 0.612 * rms          # Lloyd-Max's threshold for three levels on a Gaussian
    level = (v.abs() * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
    return torch.where(keep, torch.sign(v) * level, 0.0).reshape(-1)[:n]


def lloyd_max2_chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    v, rms, n = _chunk_rms(x, chunk)
    big = v.abs() > 0.9816 * rms
    return (torch.sign(v) * torch.where(big, 1.510, 0.4528) * rms).reshape(-1)[:n]


_ROUNDING = torch.Generator().manual_seed(99)


def stochastic_chunks(x: torch.Tensor, chunk: int, levels: int, clip: float) -> torch.Tensor:
    v, rms, n = _chunk_rms(x, chunk)
    c = (clip * rms).clamp_min(1e-30)
    step = 2 * c / (levels - 1)
    y = (v.clamp(-c, c) + c) / step
    low = y.floor()
    q = low + (torch.rand(y.shape, generator=_ROUNDING) < (y - low)).float()
    return (q * step - c).reshape(-1)[:n]


def rowcol_sign(x: torch.Tensor, shape) -> torch.Tensor:
    if len(shape) != 2:
        return sign_chunks(x, 4096)
    v = x.view(shape)
    a = v.abs().mean(1, keepdim=True)
    b = v.abs().mean(0, keepdim=True) / v.abs().mean().clamp_min(1e-30)
    r = a * b
    alpha = (v.abs() * r).sum() / (r * r).sum().clamp_min(1e-30)
    return (torch.where(v >= 0, 1.0, -1.0) * r * alpha).reshape(-1)


def compressor(spec: str, shape):
    name, _, arg = spec.partition(":")
    if name == "none":
        return None, 32.0
    n = math.prod(shape)
    if name == "sign":
        c = int(arg or 4096)
        return (lambda x: sign_chunks(x, c)), 1 + 32 * math.ceil(n / c) / n
    if name in ("int8", "int4", "int2"):
        bits, c = int(name[3]), int(arg or 512)
        return (lambda x: int_chunks(x, bits, c)), bits + 64 * math.ceil(n / c) / n
    if name in ("tern", "lm2"):
        c = int(arg or 512)
        if name == "tern":
            return (lambda x: ternary_chunks(x, c)), 1.6 + 32 * math.ceil(n / c) / n
        return (lambda x: lloyd_max2_chunks(x, c)), 2 + 32 * math.ceil(n / c) / n
    if name in ("sr2", "sr3"):
        c, _, clip = arg.partition("@")
        c, clip, levels = int(c or 512), float(clip or 2.5), 4 if name == "sr2" else 3
        return (lambda x: stochastic_chunks(x, c, levels, clip)), (2 if levels == 4 else 1.6) + 32 * math.ceil(n / c) / n
    if name == "rowcol":
        extra = 32 * (shape[0] + shape[1]) / n if len(shape) == 2 else 32 * math.ceil(n / 4096) / n
        return (lambda x: rowcol_sign(x, shape)), 1 + extra
    raise ValueError(f"unknown spec {spec!r}: none, sign[:C], int8|int4|int2[:C], rowcol, tern[:C], lm2[:C], "
                     "sr2|sr3[:C[@K]]")


@torch.no_grad()
def adamw_frozen(opt, t: int, frozen: int, betas=(0.9, 0.999), eps=1e-8) -> None:
    """AdamW whose second moment stops moving after `frozen` steps (1-bit Adam's variance freeze)."""
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.setdefault(p, {})
            if not st:
                st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
            g = p.grad
            st["m"].mul_(betas[0]).add_(g, alpha=1 - betas[0])
            if t <= frozen:
                st["v"].mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
            vhat = st["v"] / (1 - betas[1] ** min(t, frozen))
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.addcdiv_(st["m"], vhat.sqrt().add_(eps), value=-group["lr"] / (1 - betas[0] ** t))


@torch.no_grad()
def adamw_split(opt, t: int, dense_from: str, dense_grads, betas=(0.9, 0.999), eps=1e-8) -> None:
    """AdamW whose first (``m-dense``) or second (``v-dense``) moment is fed the dense mean gradient
    (`dense_grads`, by parameter) and the other the compressed one (``p.grad``)."""
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.setdefault(p, {})
            if not st:
                st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
            gm = dense_grads[p] if dense_from == "m-dense" else p.grad
            gv = dense_grads[p] if dense_from == "v-dense" else p.grad
            st["m"].mul_(betas[0]).add_(gm, alpha=1 - betas[0])
            st["v"].mul_(betas[1]).addcmul_(gv, gv, value=1 - betas[1])
            vhat = st["v"] / (1 - betas[1] ** t)
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.addcdiv_(st["m"], vhat.sqrt().add_(eps), value=-group["lr"] / (1 - betas[0] ** t))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default="sign")
    ap.add_argument("--no-ef", action="store_true", help="no residual on either pass")
    ap.add_argument("--noise", type=float, default=0.0,
                    help="add Gaussian noise of this relative L2 size to each tensor's mean gradient (after the "
                         "double pass)")
    ap.add_argument("--opt", default="adamw", choices=["adamw", "sgd"])
    ap.add_argument("--adam", default="torch", help="torch: torch.optim.AdamW; frozen:N: Adam's variance frozen "
                    "after N steps (learnt from the dense mean gradient until then)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--whiten", type=float, default=0.0, metavar="BETA",
                    help="compress v / d, d the per-coordinate RMS of the applied update (EMA with BETA)")
    ap.add_argument("--floor", type=float, default=0.01,
                    help="with --whiten: d plus this fraction of the tensor's mean d (default 0.01)")
    ap.add_argument("--warm", default="", metavar="K:SPEC", help="the first K steps compress with SPEC")
    ap.add_argument("--release", type=float, default=1.0, metavar="K",
                    help="feed each residual back a K-th at a time, both passes (1: error feedback as written)")
    ap.add_argument("--noise-whitened", type=float, default=0.0, metavar="S",
                    help="add Gaussian noise of S times each coordinate's RMS to the dense mean gradient")
    ap.add_argument("--moment", default="", choices=["", "m-dense", "v-dense"],
                    help="AdamW's first or second moment from the dense mean gradient")
    ap.add_argument("--val-windows", type=int, default=64, help="validation windows of 128 bytes (default 64)")
    ap.add_argument("--diag", action="store_true", help="per tensor: delta of each pass, residual / gradient")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lr0 = args.lr or (2e-3 if args.opt == "adamw" else 0.3)
    task = Task("lm", seed=args.seed, val_windows=args.val_windows)
    model = task.model()
    named = list(model.named_parameters())
    params = [p for _, p in named]
    comps = [compressor(args.spec, tuple(p.shape)) if p.numel() >= 1024 else (None, 32.0) for p in params]
    total = sum(p.numel() for p in params)
    bits = sum(b * p.numel() for (_, b), p in zip(comps, params)) / total
    print(f"{args.spec}: {bits:.3f} bits per element, {32 / bits:.1f}x fewer than fp32 (each pass)")
    warm_steps, _, warm_spec = args.warm.partition(":")
    warm_steps = int(warm_steps or 0)
    warm_comps = [compressor(warm_spec, tuple(p.shape)) if warm_steps and p.numel() >= 1024 else (None, 32.0)
            for p in params]
    if warm_steps:
        wbits = sum(b * p.numel() for (_, b), p in zip(warm_comps, params)) / total
        avg = (warm_steps * wbits + (args.steps - warm_steps) * bits) / args.steps
        print(f"{warm_spec} for {warm_steps} steps: {wbits:.3f} bits; over the run {avg:.3f} bits per element, "
              f"{32 / avg:.1f}x fewer")
    sq_applied = [torch.zeros(p.numel()) for p in params]     # --whiten's second moment of the applied update
    sq_dense = [torch.zeros(p.numel()) for p in params]       # --noise-whitened's, of the dense mean
    ew = [[torch.zeros(p.numel()) for p in params] for _ in range(2)]
    es = [torch.zeros(p.numel()) for p in params]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    frozen = int(args.adam.split(":")[1]) if args.adam.startswith("frozen:") else None
    if args.opt == "sgd":
        opt = torch.optim.SGD(groups, lr=lr0, momentum=0.9)
    else:
        opt = torch.optim.AdamW(groups, lr=lr0)
    sums = {n: [0.0] * 5 for n, _ in named}      # worker err, worker in, server err, server in, |e_w| / |g|
    warm, t0 = max(1, args.steps // 10), time.time()
    gen = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        lr = lr0 * (step + 1) / warm if step < warm else \
            lr0 * 0.5 * (1 + math.cos(math.pi * (step - warm) / (args.steps - warm)))
        for g in opt.param_groups:
            g["lr"] = lr
        grads, dense_grads = [], {}
        for r in range(2):
            x, y = task.batch_for(step, r)
            model.zero_grad(set_to_none=True)
            loss = task.loss(model, x, y)
            loss.backward()
            grads.append([p.grad.detach().reshape(-1).clone() for p in params])
        for j, ((name, p), (C, _)) in enumerate(zip(named, comps)):
            gs = [grads[0][j], grads[1][j]]
            if step < warm_steps:
                C = warm_comps[j][0]
            elif args.whiten and C is not None and step > 0:
                d = (sq_applied[j] / (1 - args.whiten ** step)).sqrt()
                d = d + args.floor * d.mean() + 1e-30
                C = (lambda C0, d: (lambda x: d * C0(x / d)))(C, d)
            if C is None:
                upd = (gs[0] + gs[1]) / 2
            else:
                cs = []
                for r in range(2):
                    v = gs[r] if args.no_ef else gs[r] + ew[r][j] / args.release
                    c = C(v)
                    if not args.no_ef:
                        ew[r][j] = ew[r][j] * (1 - 1 / args.release) + v - c
                    cs.append(c)
                    if r == 0:
                        sums[name][0] += float((v - c).square().sum())
                        sums[name][1] += float(v.square().sum())
                        sums[name][4] += float(ew[r][j].norm() / gs[r].norm().clamp_min(1e-30))
                v = (cs[0] + cs[1]) / 2 + (0 if args.no_ef else es[j] / args.release)
                upd = C(v)
                if not args.no_ef:
                    es[j] = es[j] * (1 - 1 / args.release) + v - upd
                sums[name][2] += float((v - upd).square().sum())
                sums[name][3] += float(v.square().sum())
            if args.whiten:
                sq_applied[j].mul_(args.whiten).addcmul_(upd, upd, value=1 - args.whiten)
            dense = (gs[0] + gs[1]) / 2
            if args.noise_whitened:
                sq_dense[j].mul_(0.999).addcmul_(dense, dense, value=0.001)
                rms = (sq_dense[j] / (1 - 0.999 ** (step + 1))).sqrt()
                upd = upd + args.noise_whitened * rms * torch.randn(upd.numel(), generator=gen)
            if args.noise:
                upd = upd + args.noise * upd.norm() / math.sqrt(upd.numel()) * torch.randn(upd.numel(), generator=gen)
            p.grad = upd.view_as(p).clone()
            dense_grads[p] = dense.view_as(p)
        if args.moment and args.opt == "adamw":
            adamw_split(opt, step + 1, args.moment, dense_grads)
        elif frozen is None or args.opt == "sgd":
            opt.step()
        else:
            adamw_frozen(opt, step + 1, frozen)
        if not math.isfinite(float(loss.detach())):
            print(f"diverged at step {step}")
            break
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}: train {float(loss):.3f}  val {task.evaluate(model)['val_loss']:.4f}  "
                  f"{time.time() - t0:.0f} s", flush=True)
    if args.diag:
        print(f"{'tensor':>22} {'delta up':>9} {'delta down':>11} {'|e_w|/|g|':>10}")
        for name, s in sums.items():
            if s[1]:
                print(f"{name:>22} {1 - s[0] / s[1]:>9.3f} {1 - s[2] / s[3]:>11.3f} {s[4] / args.steps:>10.2f}")
    print(f"final validation loss {task.evaluate(model)['val_loss']:.4f}")


if __name__ == "__main__":
    main()
