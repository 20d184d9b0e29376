"""`DoubleSqueezeConfig`: what to compress with and which switches of docs/ARCHITECTURE.md section 1 are on."""
import math
import warnings
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import List, Mapping, Optional, Sequence, Tuple, Union

from .compression.compressors import Compressor
from .compression.registry import get_compressor

__all__ = ["DoubleSqueezeConfig", "DivergenceWarning", "AUTO", "DEFAULT_CANDIDATES", "DENSE", "ROLE_PREFIX", "Role",
           "parse_policy"]

AUTO = "auto"
DEFAULT_CANDIDATES = "int4:128"
DENSE = "dense"          # a policy's spec for "averaged uncompressed"
ROLE_PREFIX = "role:"


class Role(Enum):
    """What a parameter is in the model."""

    EMBEDDING = "embedding"   # the weight of an nn.Embedding / nn.EmbeddingBag (its gradient: a few rows)
    HEAD = "head"             # the weight of the output projection (the model's last nn.Linear)
    NORM = "norm"             # the parameters of a normalisation layer (LayerNorm, RMSNorm, BatchNorm, GroupNorm...)
    BIAS = "bias"             # any other parameter named ``bias``
    MATRIX = "matrix"         # any other parameter (linear and convolution weights, ...)


PolicyLike = Union[None, str, Mapping[str, str], Sequence[Tuple[str, str]]]


def parse_policy(policy: PolicyLike) -> Tuple[Tuple[str, str], ...]:
    """A policy in any accepted form -> its canonical form, a tuple of ``(selector, spec)`` pairs (spec canonical,
    or ``"dense"``). Accepted: a mapping, a sequence of pairs, or text ``"selector=spec,selector=spec"``. Raises
    ValueError naming what is valid: an unknown role, an empty selector, a spec that does not parse."""
    if policy is None:
        return ()
    if isinstance(policy, str):
        pairs = []
        for part in (p.strip() for p in policy.split(",")):
            if not part:
                continue
            selector, eq, spec = part.rpartition("=")
            if not eq:
                raise ValueError(f"a policy in text is 'selector=spec,selector=spec' (e.g. 'role:embedding=int8,"
                                 f"role:norm=dense'), got {part!r} in {policy!r}")
            pairs.append((selector.strip(), spec.strip()))
    elif isinstance(policy, Mapping):
        pairs = list(policy.items())
    else:
        try:
            pairs = [tuple(p) for p in policy]
        except TypeError:
            raise ValueError(f"DoubleSqueezeConfig.policy is a mapping selector -> spec, got {policy!r}") from None
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"DoubleSqueezeConfig.policy: pairs (selector, spec), got {policy!r}")
    out = []
    roles = ", ".join(ROLE_PREFIX + r.value for r in Role)
    for selector, spec in pairs:
        if not isinstance(selector, str) or not selector.strip():
            raise ValueError(f"a policy selector is 'role:R' ({roles}) or a parameter-name pattern such as "
                             f"'blocks.*.attn.*', got {selector!r}")
        selector = selector.strip()
        if selector.startswith(ROLE_PREFIX):
            name = selector[len(ROLE_PREFIX):]
            if name not in {r.value for r in Role}:
                raise ValueError(f"unknown role {name!r} in policy selector {selector!r}; valid roles: {roles}")
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"policy {selector!r}: the spec is a compressor spec or {DENSE!r}, got {spec!r}")
        spec = spec.strip()
        if spec == "auto":
            raise ValueError(f"policy {selector!r}: 'auto' chooses per bucket, not per tensor; name a compressor "
                             f"or {DENSE!r}")
        if spec != DENSE:
            try:
                spec = get_compressor(spec).spec
            except ValueError as e:
                raise ValueError(f"policy {selector!r}: {e} (or {DENSE!r}: averaged uncompressed)") from None
        out.append((selector, spec))
    selectors = [s for s, _ in out]
    dup = sorted({s for s in selectors if selectors.count(s) > 1})
    if dup:
        raise ValueError(f"policy selector(s) {dup} given more than once")
    return tuple(out)


class DivergenceWarning(UserWarning):
    """An unbiased compressor whose variance is not below its signal, under error feedback: the residual
    ``e <- v - C(v)`` then grows geometrically in expectation, whatever the learning rate."""


@dataclass(frozen=True)
class DoubleSqueezeConfig:
    """Configuration of the double-pass error-compensated collective.

    Args:
        compressor: spec of the worker compressor `C_w` (default ``"int4:128"``: 4 bits per element and a scale per
            128, 6.8x fewer bytes than fp32, within 0.2% of dense on a transformer under AdamW and SGD, where 1-bit
            ``"sign"`` (32x) trails by 37%: docs/RESULTS.md section 7; ``"topk:0.01"``, ``"topk:0.01+int4"``...), or
            ``"auto"``: the engine measures its own steps and chooses per bucket between dense and `candidates`
            (`dsq_plugins.engine.auto`), so that a step is never much slower than dense.
        server_compressor: spec of the server compressor `C_s`; None means the same as `compressor` (under
            auto: the same as the bucket's choice); ``"none"`` gives a dense downlink (single-pass error feedback,
            MEM-SGD).
        worker_ef: keep the worker residual `e_i` (False: plain compressed SGD on the uplink).
        server_ef: keep the server residual `e` (False: the server re-compresses without memory).
        warmup_steps: communication rounds (steps) done with a dense average before compression starts.
        min_numel: tensors of fewer elements are averaged dense: compressing them cannot pay for the extra work.
        bucket_mb: bucket size in MiB for integrations that bucket gradients themselves (DDP buckets its own).
        seed: base seed of the compressors' randomness (`randomk`, `qsgd`); all ranks must agree on it.
        block_size: elements per block (a multiple of 8): every tensor is cut into blocks of this many elements
            (its last block may be shorter), and each compressor runs per block (sign: one scale per block;
            topk: k of each block); each block has one owner rank that runs its server pass.
        candidates: under ``compressor="auto"``, the compressors it may choose besides dense: specs separated by
            commas, or a list (default ``"int4:128"``, the one compressor that trained like dense on every model
            of the quality yardstick: exploring ``sign`` or ``grouptopk:0.03+sign`` for a few steps alone cost a
            transformer 5-7%, docs/RESULTS.md section 6). Only with auto.
        guard: the quality guard (`dsq_plugins.engine.guard`): a tensor whose compression keeps less than this fraction
            of the compressor's nominal contraction (measured per pass, per tensor, summed over the ranks) moves to
            `fallback`, and, failing that too, goes dense, with a warning; 0 turns the guard off.
        fallback: the compressor the guard moves a failing tensor to (lossy), or None: straight to dense.
        policy: per-tensor compressors, by role or name (`dsq_plugins.engine.policy`): rules ``selector -> spec``,
            the first that matches a tensor deciding, as a mapping (``{"role:embedding": "int8", "role:norm":
            "dense", "blocks.*.attn.*": "sign"}``), pairs, or text (``"role:embedding=int8,role:norm=dense"``).
            Selectors: ``role:embedding``, ``role:head``, ``role:norm``, ``role:bias``, ``role:matrix``, or a
            shell-style pattern over the parameters' qualified names; specs: a compressor or ``"dense"``. Kept
            as a tuple of ``(selector, spec)`` pairs. Default: none (every tensor uses `compressor`).
    """

    compressor: str = "int4:128"
    server_compressor: Optional[str] = None
    worker_ef: bool = True
    server_ef: bool = True
    warmup_steps: int = 0
    min_numel: int = 1024
    bucket_mb: float = 25.0
    seed: int = 0
    block_size: int = 4096
    candidates: Optional[str] = None
    guard: float = 0.1
    fallback: Optional[str] = "int4:128"
    policy: Tuple[Tuple[str, str], ...] = ()

    def __post_init__(self):
        for name in ("worker_ef", "server_ef"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DoubleSqueezeConfig.{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "min_numel", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"DoubleSqueezeConfig.{name} must be an integer >= 0, got {value!r}")
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 8 or bs % 8:
            raise ValueError(f"DoubleSqueezeConfig.block_size must be a positive multiple of 8 (elements), got {bs!r}")
        if isinstance(self.bucket_mb, bool) or not isinstance(self.bucket_mb, (int, float)) or not self.bucket_mb > 0:
            raise ValueError(f"DoubleSqueezeConfig.bucket_mb must be a number > 0, got {self.bucket_mb!r}")
        # Resolve (and so validate) every spec now, and keep them in canonical form.
        auto = isinstance(self.compressor, str) and self.compressor.strip() == AUTO
        if self.candidates is not None and not auto:
            raise ValueError(f"DoubleSqueezeConfig.candidates is for compressor='auto', not {self.compressor!r}")
        if auto:
            given = DEFAULT_CANDIDATES if self.candidates is None else self.candidates
            specs = [p for p in (given.split(",") if isinstance(given, str) else list(given))]
            if not specs or any(not isinstance(p, str) or not p.strip() for p in specs):
                raise ValueError(f"DoubleSqueezeConfig.candidates: compressor specs separated by commas (e.g. "
                                 f"{DEFAULT_CANDIDATES!r}), got {self.candidates!r}")
            specs = [_spec(p) for p in specs]
            for p in specs:
                if get_compressor(p).lossless:
                    raise ValueError(f"candidate {p!r} does not compress; auto compares the candidates with dense")
            object.__setattr__(self, "compressor", AUTO)
            object.__setattr__(self, "candidates", ",".join(dict.fromkeys(specs)))
        else:
            object.__setattr__(self, "compressor", _spec(self.compressor))
        if self.server_compressor is not None:
            object.__setattr__(self, "server_compressor", _spec(self.server_compressor))
        g = self.guard
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g < 1:
            raise ValueError(f"DoubleSqueezeConfig.guard must be a number in [0, 1) (a fraction of the compressor's "
                             f"nominal contraction; 0 turns the guard off), got {g!r}")
        object.__setattr__(self, "guard", float(g))
        if self.fallback is not None:
            object.__setattr__(self, "fallback", _spec(self.fallback))
            if get_compressor(self.fallback).lossless:
                raise ValueError(f"DoubleSqueezeConfig.fallback={self.fallback!r} does not compress; use "
                                 f"fallback=None to send a failing tensor dense")
        object.__setattr__(self, "policy", parse_policy(self.policy))
        self._warn_if_divergent()

    def _warn_if_divergent(self) -> None:
        n = self.block_size
        passes = []
        for spec in self.candidate_specs + self.policy_specs:
            passes += [("worker", get_compressor(spec), self.worker_ef),
                       ("server", self.server_for(spec), self.server_ef)]
        bad = list(dict.fromkeys((role, c.spec, omega) for role, c, ef in passes
                                 if ef and (omega := c.variance(n)) is not None and omega >= 1))
        if not bad:
            return
        which = " and ".join(f"{spec!r} on the {role} pass (variance up to {omega:.2f} x |v|^2)"
                             for role, spec, omega in bad)
        off = " or ".join(f"{role}_ef=False" for role, _, _ in bad)
        warnings.warn(
            f"{which}, over blocks of {n} elements, under error feedback: e <- v - C(v) is not a contraction, and "
            f"the residual grows geometrically whatever the learning rate (docs/RESULTS.md section 4). Use a "
            f"biased compressor (sign, topk:R, int8, int4, topk:R+int4), qsgd with at least "
            f"{math.floor(math.sqrt(n) / 2) + 1} levels, randomk with a ratio above 0.5, or {off}.",
            DivergenceWarning, stacklevel=4)

    @property
    def auto(self) -> bool:
        return self.compressor == AUTO

    @property
    def candidate_specs(self) -> List[str]:
        """The compressors auto chooses from (a fixed compressor: itself)."""
        return self.candidates.split(",") if self.auto else [self.compressor]

    @property
    def policy_specs(self) -> List[str]:
        """The compressors the policy's rules name (``"dense"`` left out)."""
        return list(dict.fromkeys(spec for _, spec in self.policy if spec != DENSE))

    @property
    def worker(self) -> Compressor:
        if self.auto:
            raise ValueError("compressor='auto' has no one worker compressor: each bucket's is chosen from "
                             f"{self.candidates!r} as the job runs; use worker_for(spec)")
        return get_compressor(self.compressor)

    @property
    def server(self) -> Compressor:
        if self.auto and self.server_compressor is None:
            raise ValueError("compressor='auto' has no one server compressor; use server_for(spec)")
        return get_compressor(self.server_compressor or self.compressor)

    def server_for(self, spec: str) -> Compressor:
        """The server compressor of a bucket whose worker compressor is `spec`."""
        return get_compressor(self.server_compressor or spec)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DoubleSqueezeConfig":
        """Build from a mapping; an unknown key raises ValueError naming the valid ones."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown DoubleSqueeze config key(s) {unknown}; valid keys: {', '.join(valid)}")
        d = dict(d)
        if isinstance(d.get("policy"), list):          # JSON turns the pairs into lists
            d["policy"] = [tuple(p) if isinstance(p, list) else p for p in d["policy"]]
        return cls(**d)


def _spec(spec) -> str:
    return get_compressor(spec).spec
