"""Convergence of DoubleSqueeze against the paper's claims, on problems that run on one CPU core in minutes.

Every run here averages with `dsq_plugins.Simulator`, the project's single-process reference of the algorithm
(n workers with their own residuals, one server with its own): the tests check every distributed integration
(DDP hook, Horovod, DeepSpeed) against it step for step, so what converges here is what they compute. The
distributed code paths themselves are covered by the tests and by ``make demo``.

Four experiments (docs/RESULTS.md has the measured numbers and the verdicts):

1. ``digits``: an MLP on scikit-learn's digits, n workers (each its own shard and minibatches), plain SGD
   ``x <- x - lr * c_t``. Dense SGD, DoubleSqueeze (sign, topk:0.01, int8) and, for sign and topk, the baselines
   of the same pipeline: no compensation (``worker_ef=False, server_ef=False``), single-pass EF / MEM-SGD
   (``server_compressor="none"``), worker-only EF (``server_ef=False``). Same seeds, same data order for every
   method; final test accuracy and training loss, mean and spread over the seeds.
2. ``speedup``: a noisy quadratic (``f(x) = 1/2 sum_j h_j x_j^2``, each worker's gradient ``h * x + sigma * xi``
   with its own Gaussian noise), lr ``a / (t + t0)``; steps until ``f(x_t)`` (exact) first reaches a target, for
   n = 1, 2, 4, 8, 16, dense and DoubleSqueeze side by side, and the ratio to n = 1 against the ideal n.
3. ``compressors``: biased (sign, topk) and unbiased (qsgd, randomk) compressors on digits, with and without
   compensation, over a grid of learning rates; divergence and the size the residuals reach are reported.

Run it::

    .venv/bin/python benchmarks/convergence.py                 # full run (about 5-10 min on one core)
    .venv/bin/python benchmarks/convergence.py --quick         # smaller, about a minute
    .venv/bin/python benchmarks/convergence.py --json runs/bench/convergence.json --outdir docs/img

Seeds are fixed and every run is deterministic (single thread, seeded generators, the compressors' seeds derived
from the step as in the distributed code).
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import dsq_plugins as dsq  # noqa: E402
from dsq_plugins.compression.compressors import QSGDCompressor, RandomKCompressor  # noqa: E402
from digits_common import digits, mlp  # noqa: E402


class ScaledQSGD(QSGDCompressor):
    """``scaled_qsgd:S``: QSGD divided by ``1 + w``, ``w = min(d / S^2, sqrt(d) / S)`` its variance bound. Biased, but
    a contraction (``E|C(x) - x|^2 <= w / (1 + w) |x|^2 < |x|^2``): the usual way to use an unbiased compressor
    with error feedback. Registered by this benchmark only, to test that remedy."""
    name = "scaled_qsgd"

    def _decompress(self, payload, numel, dtype):
        w = min(numel / self.levels ** 2, math.sqrt(numel) / self.levels)
        return super()._decompress(payload, numel, dtype).div_(1 + w)


class ScaledRandomK(RandomKCompressor):
    """``scaled_randomk:R``: random-k without the ``d / k`` rescaling (``randomk`` divided by ``1 + w``,
    ``w = d/k - 1``): a contraction, as `ScaledQSGD`. Registered by this benchmark only."""
    name = "scaled_randomk"

    def _decompress(self, payload, numel, dtype):
        return super()._decompress(payload, numel, dtype).mul_(self.k(numel) / numel)


for _cls in (ScaledQSGD, ScaledRandomK):
    if _cls.name not in dsq.available_compressors():
        dsq.register_compressor(_cls.name, _cls)


def omega(spec: str, x: torch.Tensor, draws: int = 8) -> float:
    """Measured ``E|C(x) - x|^2 / |x|^2`` on `x` (mean over `draws` seeds): error feedback needs it below 1."""
    c = dsq.get_compressor(spec)
    errs = [float((c.decompress(c.compress(x, seed=s)) - x).pow(2).sum()) for s in range(draws)]
    return statistics.fmean(errs) / float(x.pow(2).sum())


def config(spec: str, **kw) -> dsq.DoubleSqueezeConfig:
    return dsq.DoubleSqueezeConfig(compressor=spec, min_numel=0, **kw)


# name -> (worker spec, config switches); "dense" is the uncompressed average (spec "none").
def variants(spec: str) -> dict:
    return {
        f"dsq {spec}": dict(spec=spec),
        f"noef {spec}": dict(spec=spec, worker_ef=False, server_ef=False),
        f"ef1 {spec}": dict(spec=spec, server_compressor="none"),
        f"wef {spec}": dict(spec=spec, server_ef=False),
    }


LABELS = {"dsq": "DoubleSqueeze", "noef": "no compensation", "ef1": "single-pass EF (dense downlink)",
          "wef": "worker-only EF", "dense": "dense SGD"}


def make_config(method: dict) -> dsq.DoubleSqueezeConfig:
    m = dict(method)
    return config(m.pop("spec"), **m)


# ----------------------------------------------------------------------------------------------------------------
# Digits: per-worker gradients of the MLP, batched over the workers by hand (checked against autograd at start).


class BatchedMLP:
    """Forward and backward of a `nn.Sequential` of Linear and ReLU layers with cross-entropy loss, for n workers
    at once (batch dimension 0 = worker). Parameters live in one flat vector `x` (the order of
    `model.parameters()`), so the update is ``x -= lr * c``."""

    def __init__(self, model: nn.Sequential):
        self.kinds = []
        for layer in model:
            if isinstance(layer, nn.Linear) and layer.bias is not None:
                self.kinds.append("linear")
            elif isinstance(layer, nn.ReLU):
                self.kinds.append("relu")
            else:
                raise TypeError(f"BatchedMLP handles Linear (with bias) and ReLU layers, not {layer!r}")
        params = [p.detach() for p in model.parameters()]
        self.x = torch.cat([p.reshape(-1) for p in params]).clone()
        self.views, off = [], 0          # (W, b) views into x, one per linear layer
        for i in range(0, len(params), 2):
            w, b = params[i], params[i + 1]
            W = self.x[off:off + w.numel()].view(w.shape)
            off += w.numel()
            B = self.x[off:off + b.numel()]
            off += b.numel()
            self.views.append((W, B))
        self.numel = off

    def forward(self, xb):
        acts, h, li = [xb], xb, 0
        for kind in self.kinds:
            if kind == "linear":
                W, b = self.views[li]
                li += 1
                h = h @ W.T + b
            else:
                h = h.clamp_min(0)
            acts.append(h)
        return acts

    def grads(self, xb, yb):
        """xb (n, B, features), yb (n, B) -> (n, numel): each worker's gradient of its mean batch loss."""
        n, B = yb.shape
        acts = self.forward(xb)
        d = acts[-1].softmax(-1)
        d[torch.arange(n)[:, None], torch.arange(B)[None], yb] -= 1
        d /= B
        out, li = [], len(self.views)
        for k in range(len(self.kinds) - 1, -1, -1):
            if self.kinds[k] == "linear":
                li -= 1
                W, _ = self.views[li]
                out.append(d.sum(1))                             # bias
                out.append((d.transpose(1, 2) @ acts[k]).reshape(n, -1))   # weight
                if k:
                    d = d @ W
            else:
                d = d * (acts[k + 1] > 0)
        return torch.cat(out[::-1], 1)

    @torch.no_grad()
    def evaluate(self, x, y):
        logits = self.forward(x)[-1]
        return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def _check_against_autograd(seed=0):
    """The hand-written backward equals autograd's on a real batch (guards against a change of `mlp()`)."""
    x_tr, y_tr, _, _ = digits(seed)
    model = mlp(seed)
    net = BatchedMLP(model)
    idx = torch.arange(24).view(2, 12)
    mine = net.grads(x_tr[idx], y_tr[idx])
    for i in range(2):
        model.zero_grad()
        F.cross_entropy(model(x_tr[idx[i]]), y_tr[idx[i]]).backward()
        ref = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        if not torch.allclose(mine[i], ref, atol=1e-6, rtol=1e-4):
            raise AssertionError("BatchedMLP gradients differ from autograd's")


def train_digits(method: dict, seed: int, n: int, lr: float, epochs: int, batch: int) -> dict:
    """n workers, each on its own shard (rank::n) with its own shuffled minibatches; the Simulator averages.
    Returns final test accuracy, training loss, per-epoch curves, and the residuals' size."""
    x_tr, y_tr, x_te, y_te = digits(seed)
    net = BatchedMLP(mlp(seed))
    sim = dsq.Simulator(n, make_config(method))
    shards = [torch.arange(i, x_tr.shape[0], n) for i in range(n)]
    steps_per_epoch = min(len(s) for s in shards) // batch
    gen = torch.Generator().manual_seed(seed)
    loss0, _ = net.evaluate(x_tr, y_tr)
    curve_loss, curve_acc, grad_norm, resid_max = [], [], 0.0, 0.0
    diverged_at = None
    for epoch in range(epochs):
        orders = [s[torch.randperm(len(s), generator=gen)] for s in shards]
        for b in range(steps_per_epoch):
            idx = torch.stack([o[b * batch:(b + 1) * batch] for o in orders])
            g = net.grads(x_tr[idx], y_tr[idx])
            c = sim.step(list(g.unbind(0)))
            net.x.sub_(c, alpha=lr)
            grad_norm = float(g.norm(dim=1).mean())
            resid = sum(float(e.norm()) for e in sim.worker_errors) / n + float(sim.server_error.norm())
            resid_max = max(resid_max, resid / max(grad_norm, 1e-12))
        loss, acc = net.evaluate(x_tr, y_tr)[0], net.evaluate(x_te, y_te)[1]
        curve_loss.append(loss)
        curve_acc.append(acc)
        if not math.isfinite(loss) or loss > 10 * loss0 or not torch.isfinite(net.x).all():
            diverged_at = epoch + 1
            break
    return {"test_acc": curve_acc[-1] if diverged_at is None else float("nan"),
            "train_loss": curve_loss[-1] if diverged_at is None else float("nan"),
            "diverged_at_epoch": diverged_at, "curve_train_loss": curve_loss, "curve_test_acc": curve_acc,
            "residual_to_grad_max": resid_max, "steps": sim.steps, "numel": net.x.numel()}


def bytes_fewer(method: dict, numel: int) -> float:
    """Dense bytes over the uplink payload's bytes for one worker's gradient of `numel` fp32 elements, in the
    config's blocks (one tensor: the flat parameter vector, as the Simulator here sees it)."""
    cfg = make_config(method)
    if cfg.worker.lossless:
        return 1.0
    B = cfg.block_size
    sizes = [min(B, numel - a) for a in range(0, numel, B)]
    return 4 * numel / sum(cfg.worker.nbytes(n, torch.float32) for n in sizes)


# ----------------------------------------------------------------------------------------------------------------
# Noisy quadratic for the speed-up.


def steps_to_target(method: dict, n: int, seed: int, p: dict) -> int:
    """Steps until f(x_t) <= target (f exact); p: dim, h_min, sigma, x0_scale, target, max_steps."""
    d = p["dim"]
    h = torch.logspace(math.log10(p["h_min"]), 0.0, d, dtype=torch.float64).float()
    a = 2.0 / p["h_min"]           # lr_t = a / (t + t0): the classic 2/(mu t) schedule, lr_0 = 1/L (L = 1)
    t0 = a
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(d, generator=gen) * p["x0_scale"]
    sim = dsq.Simulator(n, make_config(method))
    for t in range(p["max_steps"]):
        if 0.5 * float((h * x * x).sum()) <= p["target"]:
            return t
        g = h * x + p["sigma"] * torch.randn(n, d, generator=gen)
        x.sub_(sim.step(list(g.unbind(0))), alpha=a / (t + t0))
    return p["max_steps"]


# ----------------------------------------------------------------------------------------------------------------
# Reporting helpers.


def mean_sd(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt_pct(m, s):
    return "diverged" if math.isnan(m) else f"{100 * m:5.1f} ± {100 * s:3.1f}"


def table(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
    print()


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 8, "axes.titlesize": 9, "legend.fontsize": 7})
    return plt


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt
    from PIL import Image
    plt.close(fig)
    with Image.open(path) as im:          # a 64-colour palette: a third of the bytes, no visible change
        im.convert("RGB").quantize(64).save(path, optimize=True)
    print(f"wrote {path} ({os.path.getsize(path) // 1024} KB)")


# ----------------------------------------------------------------------------------------------------------------
# The experiments.


def run_digits(P, progress):
    methods = {"dense": dict(spec="none")}
    for spec in P["digits_specs"]:
        methods.update({k: v for k, v in variants(spec).items() if k.split()[0] in P["digits_variants"]})
    for spec in P["digits_extra"]:
        methods[f"dsq {spec}"] = dict(spec=spec)
    runs = {}
    for name, m in methods.items():
        t0 = time.perf_counter()
        runs[name] = [train_digits(m, s, P["n"], P["lr"], P["epochs"], P["batch"]) for s in P["seeds"]]
        progress(f"digits {name}: {time.perf_counter() - t0:.1f} s")
    dense_acc = [r["test_acc"] for r in runs["dense"]]
    rows, summary = [], {}
    for name, rs in runs.items():
        acc = [r["test_acc"] for r in rs]
        diff = [a - b for a, b in zip(acc, dense_acc)]
        (am, asd), (dm, dsd) = mean_sd(acc), mean_sd(diff)
        lm, lsd = mean_sd([r["train_loss"] for r in rs])
        summary[name] = {"method": methods[name], "acc_mean": am, "acc_sd": asd, "diff_vs_dense_mean": dm,
                         "diff_vs_dense_sd": dsd, "train_loss_mean": lm, "train_loss_sd": lsd,
                         "diverged": sum(r["diverged_at_epoch"] is not None for r in rs),
                         "per_seed": [{k: v for k, v in r.items() if not k.startswith("curve")} for r in rs],
                         "curve_train_loss": [statistics.fmean(v) for v in zip(*[r["curve_train_loss"] for r in rs])],
                         "curve_test_acc": [statistics.fmean(v) for v in zip(*[r["curve_test_acc"] for r in rs])]}
        ratio = bytes_fewer(methods[name], rs[0]["numel"])
        summary[name]["bytes_fewer"] = ratio
        rows.append([name, fmt_pct(am, asd), "" if name == "dense" else f"{100 * dm:+5.2f} ± {100 * dsd:4.2f}",
                     f"{lm:.4f} ± {lsd:.4f}", f"{max(r['residual_to_grad_max'] for r in rs):.2f}", f"{ratio:.1f}x"])
    print(f"== digits: n={P['n']} workers, batch {P['batch']}/worker, lr {P['lr']}, {P['epochs']} epochs "
          f"({runs['dense'][0]['steps']} steps), seeds {P['seeds']}")
    table(["method", "test acc % (mean ± sd)", "vs dense, points (paired)", "train loss", "max |e|/|g|",
           "bytes fewer"], rows)
    return summary


def plot_digits(summary, path, P):
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(6, 4))
    show = ["dense"] + [f"{v} {s}" for s in P["digits_specs"] for v in ("dsq", "noef")]
    for name in show:
        s = summary[name]
        ep = range(1, len(s["curve_train_loss"]) + 1)
        style = "-" if name.startswith(("dsq", "dense")) else "--"
        label = name.replace("noef", "no-EF").replace("dsq", "DSQ")
        a1.plot(ep, s["curve_train_loss"], style, label=label, lw=1.2)
        a2.plot(ep, [100 * a for a in s["curve_test_acc"]], style, label=label, lw=1.2)
    a1.set_yscale("log")
    a1.set_xlabel("epoch")
    a1.set_title("training loss (mean over seeds)")
    a2.set_xlabel("epoch")
    a2.set_title("test accuracy % (mean over seeds)")
    a2.set_ylim(80, 100)
    a2.legend(loc="lower right")
    fig.suptitle(f"digits MLP, n={P['n']} workers, lr {P['lr']}", fontsize=9)
    _save(fig, path)


def run_speedup(P, progress):
    methods = {"dense": dict(spec="none")}
    for spec in P["speedup_specs"]:
        methods[f"dsq {spec}"] = dict(spec=spec)
    for spec in P["speedup_specs"]:
        methods[f"noef {spec}"] = dict(spec=spec, worker_ef=False, server_ef=False)
    out = {}
    for name, m in methods.items():
        t0 = time.perf_counter()
        res = {}
        for n in P["speedup_n"]:
            steps = [steps_to_target(m, n, s, P["quad"]) for s in P["speedup_seeds"]]
            res[n] = {"steps": steps, "mean": statistics.fmean(steps)}
        base = res[P["speedup_n"][0]]["mean"]
        for n in res:
            res[n]["speedup"] = base / res[n]["mean"]
        out[name] = res
        progress(f"speedup {name}: {time.perf_counter() - t0:.1f} s")
    q = P["quad"]
    print(f"== speed-up: noisy quadratic, d={q['dim']}, h in [{q['h_min']}, 1], sigma {q['sigma']}, "
          f"lr 2/(h_min (t + t0)), target f <= {q['target']}, seeds {P['speedup_seeds']}")
    rows = []
    for name in out:
        for n in P["speedup_n"]:
            r = out[name][n]
            rows.append([name, n, f"{r['mean']:.0f}", f"{r['speedup']:.2f}", n // P["speedup_n"][0],
                         f"{r['mean'] / out['dense'][n]['mean']:.3f}"])
    table(["method", "n", "steps to target", "speed-up vs n=1", "ideal", "steps / dense steps"], rows)
    return out


def plot_speedup(out, path, P):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ns = P["speedup_n"]
    marks = iter("osD^v<>")
    for name, res in out.items():
        label = name.replace("dsq", "DoubleSqueeze").replace("noef", "no compensation,")
        ax.plot(ns, [res[n]["mean"] for n in ns], next(marks) + ("--" if name.startswith("noef") else "-"),
                label=label, ms=4, lw=1.2)
    base = out["dense"][ns[0]]["mean"]
    ax.plot(ns, [base * ns[0] / n for n in ns], "k:", label="ideal 1/n", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("workers n")
    ax.set_ylabel(f"steps to f(x) <= {P['quad']['target']}")
    ax.set_title("linear speed-up on a noisy quadratic (mean over seeds)")
    ax.legend()
    _save(fig, path)


def run_compressors(P, progress):
    x_tr, y_tr, _, _ = digits(P["grid_seed"])
    g0 = BatchedMLP(mlp(P["grid_seed"])).grads(x_tr[None], y_tr[None])[0]     # full-batch gradient at the start
    rows, out = [], {}
    for spec in ["none"] + P["grid_specs"]:
        kinds = [("dense", dict(spec="none"))] if spec == "none" else \
            [("dsq", dict(spec=spec)), ("noef", dict(spec=spec, worker_ef=False, server_ef=False))]
        for kind, m in kinds:
            t0 = time.perf_counter()
            res = {lr: train_digits(m, P["grid_seed"], P["n"], lr, P["grid_epochs"], P["batch"])
                   for lr in P["grid_lrs"]}
            ok = {lr: r for lr, r in res.items() if r["diverged_at_epoch"] is None}
            best = max(ok, key=lambda lr: ok[lr]["test_acc"]) if ok else None
            name = "dense" if spec == "none" else f"{kind} {spec}"
            w = omega(spec, g0) if kind == "dsq" else None
            out[name] = {"method": m, "best_lr": best, "omega": w,
                         "by_lr": {str(lr): {k: v for k, v in r.items() if not k.startswith("curve")}
                                   for lr, r in res.items()}}
            cells = []
            for lr in P["grid_lrs"]:
                r = res[lr]
                cells.append(f"div@{r['diverged_at_epoch']}" if r["diverged_at_epoch"] is not None
                             else f"{100 * r['test_acc']:.1f}")
            rmax = max(r["residual_to_grad_max"] for r in res.values())
            rows.append([name] + cells + ["-" if w is None else f"{w:.3g}", "-" if kind != "dsq" else f"{rmax:.3g}"])
            progress(f"compressors {name}: {time.perf_counter() - t0:.1f} s")
    print(f"== compressors on digits: n={P['n']}, {P['grid_epochs']} epochs, seed {P['grid_seed']}; "
          f"test accuracy % per lr (div@E: diverged in epoch E)")
    table(["method"] + [f"lr {lr}" for lr in P["grid_lrs"]] + ["omega", "max |e|/|g|"], rows)
    return out


def plot_compressors(out, path, P):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    specs = P["grid_specs"]
    dense = out["dense"]["by_lr"][str(out["dense"]["best_lr"])]["test_acc"]
    w = 0.38
    for j, (kind, color) in enumerate([("dsq", "C0"), ("noef", "C1")]):
        for i, spec in enumerate(specs):
            o = out[f"{kind} {spec}"]
            x = i + (j - 0.5) * w
            if o["best_lr"] is None:
                ax.bar(x, 1, w, color="none", edgecolor=color, hatch="xx")
                ax.text(x, 2, "diverged\nat every lr", rotation=90, ha="center", va="bottom", fontsize=6)
            else:
                acc = 100 * o["by_lr"][str(o["best_lr"])]["test_acc"]
                ax.bar(x, acc, w, color=color)
                ax.text(x, acc + 0.5, f"lr {o['best_lr']}", rotation=90, ha="center", va="bottom", fontsize=6)
    ax.bar([], [], color="C0", label="DoubleSqueeze (best lr)")
    ax.bar([], [], color="C1", label="no compensation (best lr)")
    ax.axhline(100 * dense, color="k", ls=":", lw=1, label=f"dense SGD {100 * dense:.1f}")
    ax.set_xticks(range(len(specs)))
    ax.set_xticklabels(specs, rotation=20, fontsize=7)
    ax.set_ylim(0, 128)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"digits, n={P['n']}: best accuracy over lr {P['grid_lrs']}")
    ax.legend(loc="upper center", fontsize=6, ncol=3)
    _save(fig, path)


def params(quick: bool) -> dict:
    if quick:
        return dict(n=4, batch=16, lr=0.3, epochs=8, seeds=[0], digits_specs=["sign", "topk:0.01"], digits_extra=[],
                    digits_variants=["dsq", "noef"],
                    speedup_specs=["sign"], speedup_n=[1, 2, 4, 8], speedup_seeds=[0],
                    quad=dict(dim=256, h_min=0.1, sigma=1.0, x0_scale=0.3, target=0.5, max_steps=200000),
                    grid_specs=["sign", "qsgd:16", "randomk:0.1"], grid_lrs=[0.3, 0.03], grid_epochs=5, grid_seed=0)
    return dict(n=8, batch=16, lr=0.3, epochs=40, seeds=[0, 1, 2, 3, 4], digits_specs=["sign", "topk:0.01"],
                digits_variants=["dsq", "noef", "ef1", "wef"],
                digits_extra=["int8", "int4", "int2", "topk:0.01+int4", "topk:0.01+sign", "grouptopk:0.03+sign",
                              "grouptopk:0.03+int4"],
                speedup_specs=["sign", "topk:0.05"], speedup_n=[1, 2, 4, 8, 16],
                speedup_seeds=[0, 1, 2],
                quad=dict(dim=256, h_min=0.1, sigma=1.0, x0_scale=0.3, target=0.2, max_steps=200000),
                grid_specs=["sign", "topk:0.01", "qsgd:16", "qsgd:64", "qsgd:255", "scaled_qsgd:16", "randomk:0.1",
                            "randomk:0.5", "randomk:0.75", "scaled_randomk:0.1"],
                grid_lrs=[1.0, 0.3, 0.1, 0.03, 0.01], grid_epochs=20, grid_seed=0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller settings, about a minute")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--outdir", default=None, help="write the PNG plots here (e.g. docs/img)")
    ap.add_argument("--only", default="digits,speedup,compressors",
                    help="comma-separated subset of: digits, speedup, compressors")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    _check_against_autograd()
    P = params(args.quick)
    only = set(args.only.split(","))
    t_start = time.perf_counter()
    progress = lambda msg: print(f"  [{time.perf_counter() - t_start:6.1f} s] {msg}", file=sys.stderr)  # noqa: E731
    result = {"quick": args.quick, "params": P, "torch": torch.__version__, "python": platform.python_version()}
    outdir = Path(args.outdir) if args.outdir else None
    if outdir:
        outdir.mkdir(parents=True, exist_ok=True)
    if "digits" in only:
        result["digits"] = run_digits(P, progress)
        if outdir:
            plot_digits(result["digits"], outdir / "convergence_digits.png", P)
    if "speedup" in only:
        result["speedup"] = run_speedup(P, progress)
        if outdir:
            plot_speedup(result["speedup"], outdir / "speedup.png", P)
    if "compressors" in only:
        result["compressors"] = run_compressors(P, progress)
        if outdir:
            plot_compressors(result["compressors"], outdir / "compressors.png", P)
    result["wall_s"] = time.perf_counter() - t_start
    print(f"total wall time {result['wall_s']:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
