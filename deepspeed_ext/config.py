"""The ``"doublesqueeze"`` section of a DeepSpeed config, validated with pydantic as DeepSpeed validates its own.

    {"train_micro_batch_size_per_gpu": 32, ...,
     "doublesqueeze": {"enabled": true, "compressor": "int4:128", "server_compressor": null, "worker_ef": true,
                       "server_ef": true, "warmup_steps": 0, "min_numel": 1024, "bucket_mb": 25, "seed": 0,
                       "block_size": 4096, "guard": 0.1, "fallback": "int4:128",
                       "policy": {"role:embedding": "int8", "role:norm": "dense"}}}

Every key is optional; the defaults are `dsq_plugins.DoubleSqueezeConfig`'s. Two keys belong to the sharded stages
only: ``"param_compressor"`` (ZeRO-3's parameter gathers, default ``"int8"``) and ``"residual_dtype"`` (ZeRO-2/3's
worker residual, ``"fp32"`` or ``"bf16"``).

Absent, or ``"enabled": false``, means stock DeepSpeed (with a warning when the section holds other settings).
"""
import json
import os
import warnings
from typing import Any, Dict, List, Literal, Optional, Union

from deepspeed.runtime.config_utils import DeepSpeedConfigModel
from pydantic import Field, PrivateAttr, ValidationError, field_validator

from dsq_plugins.config import DoubleSqueezeConfig
from dsq_plugins.config import AUTO, parse_policy
from dsq_plugins.compression.registry import get_compressor

__all__ = ["SECTION", "DoubleSqueezeSection", "read_section"]

SECTION = "doublesqueeze"


_D = DoubleSqueezeConfig()       # the defaults are DoubleSqueezeConfig's


class DoubleSqueezeSection(DeepSpeedConfigModel):
    """The fields of `dsq_plugins.DoubleSqueezeConfig`, plus `enabled`; their defaults are that config's. Unknown
    keys are refused."""

    enabled: bool = False
    compressor: str = _D.compressor
    server_compressor: Optional[str] = _D.server_compressor
    worker_ef: bool = _D.worker_ef
    server_ef: bool = _D.server_ef
    warmup_steps: int = Field(_D.warmup_steps, ge=0)
    min_numel: int = Field(_D.min_numel, ge=0)
    bucket_mb: float = Field(_D.bucket_mb, gt=0)
    seed: int = Field(_D.seed, ge=0)
    block_size: int = Field(_D.block_size, ge=8, multiple_of=8)
    candidates: Optional[Union[str, List[str]]] = _D.candidates
    guard: float = Field(_D.guard, ge=0, lt=1)
    fallback: Optional[str] = _D.fallback
    # per-tensor compressors: {"role:embedding": "int8", "blocks.*.attn.*": "sign"} (DoubleSqueezeConfig.policy)
    policy: Optional[Union[Dict[str, str], List[List[str]], str]] = None
    # ZeRO-3 only: the compressor of the parameter all-gathers (no residual: every rank computes with Q(x))
    param_compressor: str = "int8"
    # ZeRO-2/3 only: the worker residual's storage ("bf16": half the memory; the compensation still runs in fp32)
    residual_dtype: Literal["fp32", "bf16"] = "fp32"
    # DeepSpeedConfigModel drops every "auto" value (the Hugging Face Trainer's placeholder) before validation;
    # ours is a real choice, so `read_section` takes it out first and keeps it here.
    _auto: bool = PrivateAttr(False)

    @field_validator("policy")
    @classmethod
    def _valid_policy(cls, policy):
        return [list(p) for p in parse_policy(policy)] or None    # ValueError names the valid roles / compressors

    @field_validator("param_compressor")
    @classmethod
    def _known_param_compressor(cls, spec):
        return get_compressor(spec).spec     # ValueError names the valid ones

    @field_validator("compressor", "server_compressor", "fallback")
    @classmethod
    def _known_compressor(cls, spec):
        if spec is None or spec.strip() == AUTO:
            return spec if spec is None else AUTO
        return get_compressor(spec).spec     # ValueError names the valid ones

    def to_config(self) -> DoubleSqueezeConfig:
        d = self.model_dump(exclude={"enabled", "param_compressor", "residual_dtype"})
        d["policy"] = [tuple(p) for p in d["policy"] or ()]
        if self._auto:
            d["compressor"] = AUTO
        return DoubleSqueezeConfig(**d)


def _load(config: Union[str, os.PathLike, Dict[str, Any]]) -> Dict[str, Any]:
    if isinstance(config, dict):
        return config
    with open(config) as f:
        try:
            return json.load(f)
        except ValueError:                      # DeepSpeed also reads hjson
            import hjson
            f.seek(0)
            return hjson.load(f)


def read_section(config: Union[str, os.PathLike, Dict[str, Any], None]) -> Optional[DoubleSqueezeSection]:
    """The validated section of a DeepSpeed config (a dict or a JSON file), or None if it is absent or
    disabled. A bad key or value raises ValueError naming the valid keys, or the valid compressors."""
    if config is None:
        return None
    section = _load(config).get(SECTION)
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ValueError(f'DeepSpeed config: "{SECTION}" must be an object, got {section!r}')
    auto = isinstance(section.get("compressor"), str) and section["compressor"].strip() == AUTO
    try:
        parsed = DoubleSqueezeSection(**{k: v for k, v in section.items() if not (auto and k == "compressor")})
        parsed._auto = auto
    except ValidationError as e:
        valid = ", ".join(DoubleSqueezeSection.model_fields)
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or SECTION}: {err['msg']}" for err in e.errors())
        raise ValueError(f'DeepSpeed config "{SECTION}" section is invalid: {problems}. Valid keys: {valid}') from None
    if not parsed.enabled and set(section) - {"enabled"}:
        warnings.warn(f'DeepSpeed config: the "{SECTION}" section is ignored because it does not say "enabled": true '
                      f'(DeepSpeed\'s own sections are off by default too); add "enabled": true to switch '
                      f'DoubleSqueeze on', UserWarning, stacklevel=3)
    if not parsed.enabled:
        return None
    try:
        parsed.to_config()                      # what only the fields together can say (candidates without auto)
    except ValueError as e:
        raise ValueError(f'DeepSpeed config "{SECTION}" section is invalid: {e}') from None
    return parsed
