"""`TensorPolicy`: which compressor each tensor uses, by its role in the model or by its name.

A policy is an ordered list of rules ``selector -> spec``, given as ``DoubleSqueezeConfig(policy=...)``::

    policy={"role:embedding": "int8", "role:head": "int8", "role:norm": "dense", "blocks.*.attn.*": "sign"}

- A selector ``role:R`` matches the parameters of role R (`Role`: embedding, head, norm, bias, matrix); any other
  selector is a shell-style pattern (`fnmatch`, case-sensitive) matched against the parameter's qualified name
  (``blocks.0.attn.qkv.weight``).
- A spec is a compressor spec (``"int8"``, ``"sign"``, ``"topk:0.01+int4"``...) or ``"dense"``: the tensor is
  averaged uncompressed, as tensors under ``min_numel`` are.
- The first rule that matches a tensor decides; a tensor no rule matches uses the config's compressor (under
  ``compressor="auto"``: the bucket's choice; when auto sends a bucket dense, every tensor in it goes dense).
- The quality guard acts on top: a tensor that fails under its rule's compressor moves to the fallback, then dense.

What a rule needs to know about a tensor is a `TensorInfo`: its name, shape and roles. Frontends that see the
model give names and module types (`infer_roles`): roles are then exact (an ``nn.Embedding``'s weight, a norm
layer's parameters, the last ``nn.Linear``'s weight as the head). A tensor known by shape alone (DDP's hook without
``module=``) has the roles its shape shows: 1-D parameters are ``norm`` and ``bias`` at once (a rule for either
applies), others ``matrix``; ``embedding`` and ``head`` and name patterns then cannot be decided, and a policy
that uses them is refused before the first step with the way to give the names.

Bad input is refused early: an unknown role or a spec that does not parse when the config is built
(`parse_policy`), a name pattern that matches no parameter of the model when the tensors are first seen
(`TensorPolicy.check`), before anything is compressed.
"""
import fnmatch
import warnings
from dataclasses import dataclass
from typing import Dict, FrozenSet, Hashable, Iterable, List, Optional, Sequence, Tuple

import torch

from ..config import DENSE, ROLE_PREFIX, Role, parse_policy

__all__ = ["Role", "Rule", "TensorInfo", "TensorPolicy", "DENSE", "ROLE_PREFIX", "parse_policy", "infer_roles",
           "roles_from_shape", "roles_from_name", "strip_wrapper_prefix", "unwrap", "PolicyError"]


class PolicyError(ValueError):
    """A policy that cannot be applied to this model (a pattern matching nothing, a role that needs names)."""


_NEED_NAMES = frozenset({Role.EMBEDDING, Role.HEAD})


@dataclass(frozen=True)
class Rule:
    """One rule: `selector` (``role:R`` or a name pattern) -> `spec` (canonical compressor spec, or None: dense)."""

    selector: str
    spec: Optional[str]

    @property
    def role(self) -> Optional[Role]:
        return Role(self.selector[len(ROLE_PREFIX):]) if self.selector.startswith(ROLE_PREFIX) else None

    def matches(self, info: "TensorInfo") -> bool:
        role = self.role
        if role is not None:
            return role in info.roles
        return info.name is not None and fnmatch.fnmatchcase(info.name, self.selector)

    @property
    def label(self) -> str:
        return self.spec or DENSE


@dataclass(frozen=True)
class TensorInfo:
    """What the policy knows of a tensor: its qualified name (None: unknown), shape, and roles."""

    name: Optional[str]
    shape: Tuple[int, ...]
    roles: FrozenSet[Role]
    named: bool = True          # the roles come from the model (False: from the shape alone)


# -- roles ---------------------------------------------------------------------------------------------------------
_NORM_TYPES = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.LocalResponseNorm,
               torch.nn.modules.batchnorm._NormBase) + ((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ())


def _is_norm(module: torch.nn.Module) -> bool:
    # Transformers' and others' own norm classes (LlamaRMSNorm, T5LayerNorm, ...) are not subclasses of torch's.
    return isinstance(module, _NORM_TYPES) or type(module).__name__.lower().endswith("norm")


def roles_from_shape(shape: Sequence[int]) -> FrozenSet[Role]:
    """The roles a tensor known only by its shape has: 1-D are norms or biases (both), the rest matrices."""
    return frozenset({Role.NORM, Role.BIAS}) if len(shape) <= 1 else frozenset({Role.MATRIX})


def infer_roles(module: torch.nn.Module) -> Dict[str, Tuple[torch.Tensor, FrozenSet[Role]]]:
    """Qualified name -> (parameter, roles) for every parameter of `module` (shared ones once, under their first
    name, as ``named_parameters`` gives them). The head is the weight of the last ``nn.Linear`` registered, unless
    it is shared with an embedding (a tied head is the embedding)."""
    owners = {}
    last_linear = None
    for mname, m in module.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), (m, pname))
        if isinstance(m, torch.nn.Linear):
            last_linear = m
    out = {}
    for name, p in module.named_parameters():
        m, leaf = owners[id(p)]
        if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
            role = Role.EMBEDDING
        elif _is_norm(m):
            role = Role.NORM
        elif leaf == "bias":
            role = Role.BIAS
        elif m is last_linear and leaf == "weight":
            role = Role.HEAD
        else:
            role = Role.MATRIX
        out[name] = (p, frozenset({role}))
    return out


def roles_from_name(name: str, shape: Sequence[int]) -> FrozenSet[Role]:
    """The role of a parameter known by name and shape but not by module (Horovod's ``named_parameters``): a
    leaf ``bias`` is a bias, unless its module's name says norm; other 1-D parameters are norms; a matrix whose
    name says ``emb`` (``embed``, ``wte``, ``wpe``) is an embedding, one that says ``head`` or ``classifier`` the
    head; the rest matrices."""
    parts = name.lower().split(".")
    leaf, owner = parts[-1], ".".join(parts[:-1])
    normish = "norm" in owner or any(p.startswith(("ln", "bn")) for p in parts[:-1])
    if len(shape) <= 1:
        return frozenset({Role.NORM if normish or leaf != "bias" else Role.BIAS})
    if "emb" in owner or owner.split(".")[-1] in ("wte", "wpe", "tok", "pos"):
        return frozenset({Role.EMBEDDING})
    if "head" in owner or "classifier" in owner:
        return frozenset({Role.HEAD})
    return frozenset({Role.MATRIX})


def strip_wrapper_prefix(name: str) -> str:
    """``module.x`` (DDP, DataParallel) and ``_orig_mod.x`` (torch.compile) -> ``x``."""
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The user's model inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return module
        module = inner


# -- the policy ----------------------------------------------------------------------------------------------------
class TensorPolicy:
    """The rules of a config's policy, resolved per tensor (module docstring).

    Args:
        rules: the canonical ``(selector, spec)`` pairs (`parse_policy`).
    """

    def __init__(self, rules: Iterable[Tuple[str, str]]):
        self.rules: List[Rule] = [Rule(sel, None if spec == DENSE else spec) for sel, spec in rules]
        self._resolved: Dict[Hashable, Optional[Rule]] = {}
        self.assignments: Dict[Hashable, str] = {}       # key -> the spec a rule gave it ("dense" for dense)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def rule_for(self, key: Hashable, info: Optional[TensorInfo]) -> Optional[Rule]:
        """The first rule matching tensor `key` (`info`: what is known of it), or None; cached per key."""
        if key in self._resolved:
            return self._resolved[key]
        rule = None
        if info is not None:
            rule = next((r for r in self.rules if r.matches(info)), None)
        self._resolved[key] = rule
        if rule is not None:
            self.assignments[key] = rule.label
        return rule

    def check(self, infos: Sequence[TensorInfo], complete: bool = True) -> None:
        """Refuse, before the first step, a policy that cannot be applied to these tensors: where tensors are
        known by shape only, a rule that needs names; and, if `infos` is `complete` (every tensor the integration
        will reduce), a name pattern matching none of them. A role no tensor has only warns (a shared config may
        name a role some models lack)."""
        if not self.rules:
            return
        unnamed = [i for i in infos if not i.named]
        for r in self.rules:
            role = r.role
            if unnamed and (role is None or role in _NEED_NAMES):
                what = f"role {role.value!r}" if role is not None else f"the name pattern {r.selector!r}"
                raise PolicyError(
                    f"policy {r.selector!r}: {what} needs the parameters' names, and this integration sees "
                    f"{len(unnamed)} tensor(s) by shape only; under DDP pass the model: "
                    f"DoubleSqueezeState(config, module=model) (or state.attach(model)). Without names only "
                    f"'role:norm', 'role:bias' (both: every 1-D parameter) and 'role:matrix' apply")
            if complete and not any(r.matches(i) for i in infos):
                if role is None:
                    names = [i.name for i in infos if i.name is not None]
                    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                    raise PolicyError(f"policy pattern {r.selector!r} matches no parameter of the model "
                                      f"({len(names)} parameters: {shown}); patterns are shell-style "
                                      f"('blocks.*.attn.*') over the qualified names")
                warnings.warn(f"policy {r.selector!r}: no parameter of the model has role {role.value!r}",
                              stacklevel=3)

    def report(self, describe=str) -> Dict[str, str]:
        """Tensor name -> the spec its rule gave it, for the tensors a rule decided."""
        return {describe(k): v for k, v in self.assignments.items()}

    def state_dict(self) -> dict:
        return {"assignments": dict(self.assignments)}
