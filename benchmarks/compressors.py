"""Speed and wire size of every built-in compressor on one large tensor, block by block, relative to a plain copy.

What it measures, in one run, single-threaded (``torch.set_num_threads(1)``), on ``torch.randn(numel)`` fp32
(default 16M = 16 * 1024 * 1024 elements, 64 MiB), cut into blocks of ``--block-size`` elements (4096) as the
engine cuts every gradient (`dsq_plugins.engine.codec.BlockCodec`: one batched call for all blocks):

- time: the median over ``--repeats`` repetitions (after one warm-up) of encoding then decoding, reported as
  a ratio to the median of ``x.clone()``, which is timed in the same run, interleaved with the compressors so that
  both see the same machine load. The clone is the yardstick because it is the cheapest thing that touches every
  element and allocates a fresh output, which every compressor has to do at least once (decompression).
- bytes: the frame's size, the exact bytes on the wire (every block's payload), reported as the reduction factor
  ``fp32 bytes / frame bytes``.
- context: ``torch.topk`` alone (1% of ``|x|``, unsorted) as a ratio to the clone, i.e. what a naive exact top-k
  would cost before any packing.

Targets (printed as PASS or MISS): ``sign`` at most 3x the clone and at least 28x fewer bytes than fp32;
``topk:0.01`` at most 4x the clone and at least 40x fewer bytes.

Run it::

    .venv/bin/python benchmarks/compressors.py                      # the table
    .venv/bin/python benchmarks/compressors.py --json runs/bench/compressors.json
    .venv/bin/python benchmarks/compressors.py --numel 1048576 --repeats 3 --specs sign,topk:0.01

``make bench`` runs ``benchmarks/compressors.py --json runs/bench/compressors.json``.
"""
import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import dsq_plugins as dsq
from dsq_plugins.engine.codec import BlockCodec

DEFAULT_SPECS = ["none", "fp16", "bf16", "sign", "topk:0.01", "randomk:0.01", "qsgd:16", "int8"]

# spec -> (max time as a multiple of clone, min reduction factor of bytes vs fp32)
TARGETS = {"sign": (3.0, 28.0), "topk:0.01": (4.0, 40.0)}


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run(numel: int, repeats: int, specs, seed: int = 0, progress: bool = True, block_size: int = 4096) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    x = torch.randn(numel, dtype=torch.float32)
    fp32_bytes = numel * 4
    compressors = [BlockCodec(dsq.get_compressor(s), block_size) for s in specs]
    k = max(1, math.ceil(0.01 * numel))

    clone_s = []
    results = {}
    steps = len(specs) * (repeats + 1) + (repeats + 1)
    bar = tqdm(total=steps, desc="bench", unit="run", disable=not progress, file=sys.stderr)

    # Warm-up of the yardstick.
    _timed(lambda: x.clone())
    for spec, c in zip(specs, compressors):
        bar.set_postfix_str(spec)
        comp_s, dec_s, total_s = [], [], []
        nbytes = None
        for rep in range(repeats + 1):              # rep 0 is the warm-up
            s = seed + rep
            t_clone, _ = _timed(lambda: x.clone())
            t_c, (p, _) = _timed(lambda: c.encode(x, seed=s))
            t_d, y = _timed(lambda: c.decode(p, x.shape, x.dtype, seed=s))
            nbytes = p.numel()
            del p, y
            if rep:
                clone_s.append(t_clone)
                comp_s.append(t_c)
                dec_s.append(t_d)
                total_s.append(t_c + t_d)
            bar.update(1)
        results[spec] = {"compress_ms": 1e3 * statistics.median(comp_s),
                         "decompress_ms": 1e3 * statistics.median(dec_s),
                         "total_ms": 1e3 * statistics.median(total_s),
                         "nbytes": nbytes, "reduction": fp32_bytes / nbytes}

    bar.set_postfix_str("torch.topk")
    topk_s = []
    ax = x.abs()
    for rep in range(repeats + 1):
        t, _ = _timed(lambda: torch.topk(ax, k, sorted=False))
        t_clone, _ = _timed(lambda: x.clone())
        if rep:
            topk_s.append(t)
            clone_s.append(t_clone)
        bar.update(1)
    bar.close()

    clone_ms = 1e3 * statistics.median(clone_s)
    for r in results.values():
        r["time_ratio"] = r["total_ms"] / clone_ms
    topk_ms = 1e3 * statistics.median(topk_s)

    targets = {}
    for spec, (max_ratio, min_reduction) in TARGETS.items():
        if spec in results:
            r = results[spec]
            targets[spec] = {"max_time_ratio": max_ratio, "min_reduction": min_reduction,
                             "time_ratio": r["time_ratio"], "reduction": r["reduction"],
                             "time_ok": r["time_ratio"] <= max_ratio, "bytes_ok": r["reduction"] >= min_reduction}
            targets[spec]["pass"] = targets[spec]["time_ok"] and targets[spec]["bytes_ok"]

    return {"numel": numel, "block_size": block_size, "dtype": "float32", "threads": torch.get_num_threads(),
            "repeats": repeats,
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "clone_ms": clone_ms, "fp32_bytes": fp32_bytes, "compressors": results,
            "torch_topk_1pct": {"k": k, "ms": topk_ms, "time_ratio": topk_ms / clone_ms},
            "targets": targets}


def format_table(res: dict) -> str:
    lines = [f"numel={res['numel']} fp32 in blocks of {res['block_size']}, {res['threads']} thread, median of "
             f"{res['repeats']} "
             f"(after 1 warm-up), torch {res['torch']}",
             f"clone: {res['clone_ms']:.1f} ms",
             "",
             f"{'spec':<14}{'compress ms':>12}{'decomp ms':>11}{'total ms':>10}{'x clone':>9}"
             f"{'wire bytes':>13}{'fp32/bytes':>12}"]
    lines.append("-" * len(lines[-1]))
    for spec, r in res["compressors"].items():
        lines.append(f"{spec:<14}{r['compress_ms']:>12.1f}{r['decompress_ms']:>11.1f}{r['total_ms']:>10.1f}"
                     f"{r['time_ratio']:>9.2f}{r['nbytes']:>13d}{r['reduction']:>12.2f}")
    t = res["torch_topk_1pct"]
    lines += ["", f"context: torch.topk of 1% (k={t['k']}) on |x| alone: {t['ms']:.1f} ms = "
                  f"{t['time_ratio']:.2f}x clone"]
    if res["targets"]:
        lines.append("")
        lines.append("targets:")
        for spec, g in res["targets"].items():
            verdict = "PASS" if g["pass"] else "MISS"
            lines.append(f"  {spec:<11} time {g['time_ratio']:.2f}x clone (<= {g['max_time_ratio']:g}x: "
                         f"{'ok' if g['time_ok'] else 'no'}), bytes {g['reduction']:.2f}x fewer "
                         f"(>= {g['min_reduction']:g}x: {'ok' if g['bytes_ok'] else 'no'})  {verdict}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel", type=int, default=16 * 1024 * 1024, help="elements of the fp32 tensor")
    ap.add_argument("--repeats", type=int, default=7, help="timed repetitions per compressor (after a warm-up)")
    ap.add_argument("--specs", default=",".join(DEFAULT_SPECS), help="comma-separated compressor specs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block-size", type=int, default=4096, help="elements per block")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = ap.parse_args(argv)
    specs = [s.strip() for s in args.specs.split(",") if s.strip()]
    if args.numel < 1 or args.repeats < 1 or not specs:
        ap.error("--numel and --repeats must be positive and --specs non-empty")
    for s in specs:
        try:
            dsq.get_compressor(s)
        except ValueError as e:
            ap.error(str(e))

    res = run(args.numel, args.repeats, specs, seed=args.seed, progress=not args.no_progress,
              block_size=args.block_size)
    print(format_table(res))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2) + "\n")
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
