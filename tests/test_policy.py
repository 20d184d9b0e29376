"""The per-tensor policy: parsing and its errors, roles from modules, names and shapes, first-match resolution,
and the collective routing each tensor to its rule's compressor (against the Simulator, in one process)."""
import json

import pytest
import torch
from torch import nn

import dsq_plugins as dsq
from dsq_plugins.config import Role
from dsq_plugins.engine.policy import (PolicyError, TensorInfo, TensorPolicy, infer_roles, roles_from_name,
                                       roles_from_shape)

from .checks import VALID_NAMES


def test_forms_parse_to_one_canonical_tuple_and_round_trip():
    as_map = dsq.DoubleSqueezeConfig(policy={"role:embedding": "int8", "role:norm": "dense", "fc.*": "topk:0.01"})
    as_text = dsq.DoubleSqueezeConfig(policy=" role:embedding=int8 , role:norm=dense,fc.*=topk:0.01")
    as_pairs = dsq.DoubleSqueezeConfig(policy=[("role:embedding", "int8"), ("role:norm", "dense"),
                                               ("fc.*", "topk:0.01")])
    assert as_map.policy == as_text.policy == as_pairs.policy == (
        ("role:embedding", "int8"), ("role:norm", "dense"), ("fc.*", "topk:0.01"))
    assert dsq.DoubleSqueezeConfig.from_dict(json.loads(json.dumps(as_map.to_dict()))) == as_map
    assert dsq.DoubleSqueezeConfig().policy == ()
    assert as_map.policy_specs == ["int8", "topk:0.01"]


@pytest.mark.parametrize("policy, match", [
    ({"role:embeding": "int8"}, "unknown role 'embeding'.*valid roles: role:embedding, role:head, role:norm, "
                                "role:bias, role:matrix"),
    ({"role:norm": "int9"}, "policy 'role:norm': unknown compressor 'int9'.*" + VALID_NAMES),
    ({"fc.*": "topk:2"}, "policy 'fc.\\*': topk: the ratio must be a number in"),
    ({"": "int8"}, "a policy selector is 'role:R'"),
    ({"fc.*": ""}, "a compressor spec or 'dense'"),
    ({"fc.*": "auto"}, "'auto' chooses per bucket"),
    ("role:norm", "'selector=spec,selector=spec'"),
    ([("role:norm", "dense", "x")], "pairs"),
    ("role:norm=dense,role:norm=int8", "given more than once"),
])
def test_bad_policies_name_what_is_valid(policy, match):
    with pytest.raises(ValueError, match=match):
        dsq.DoubleSqueezeConfig(policy=policy)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(30, 8)
        self.block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.norm = nn.RMSNorm(8)
        self.lm_head = nn.Linear(8, 30, bias=False)


def test_roles_from_modules_names_and_shapes():
    roles = {n: r for n, (_, r) in infer_roles(Tiny()).items()}
    assert roles == {"tok.weight": {Role.EMBEDDING}, "block.0.weight": {Role.NORM}, "block.0.bias": {Role.NORM},
                     "block.1.weight": {Role.MATRIX}, "block.1.bias": {Role.BIAS}, "block.3.weight": {Role.MATRIX},
                     "block.3.bias": {Role.BIAS}, "norm.weight": {Role.NORM}, "lm_head.weight": {Role.HEAD}}
    tied = Tiny()
    tied.lm_head.weight = tied.tok.weight           # a tied head is the embedding, named once
    assert {n: r for n, (_, r) in infer_roles(tied).items()}["tok.weight"] == {Role.EMBEDDING}
    assert "lm_head.weight" not in infer_roles(tied)
    # by name (Horovod's named_parameters): GPT-2's and the yardstick LM's names
    by_name = {"transformer.wte.weight": Role.EMBEDDING, "transformer.h.0.ln_1.weight": Role.NORM,
               "transformer.h.0.ln_1.bias": Role.NORM, "transformer.h.0.attn.c_attn.bias": Role.BIAS,
               "transformer.h.0.attn.c_attn.weight": Role.MATRIX, "lm_head.weight": Role.HEAD,
               "tok.weight": Role.EMBEDDING, "blocks.0.ln1.weight": Role.NORM, "classifier.weight": Role.HEAD}
    for name, role in by_name.items():
        shape = (8,) if role in (Role.NORM, Role.BIAS) else (8, 8)
        assert roles_from_name(name, shape) == {role}, name
    assert roles_from_shape((8,)) == {Role.NORM, Role.BIAS} and roles_from_shape((8, 8)) == {Role.MATRIX}


def _infos(model):
    return {n: TensorInfo(n, tuple(p.shape), r) for n, (p, r) in infer_roles(model).items()}


def test_first_matching_rule_decides_and_checks_refuse_what_cannot_apply():
    cfg = dsq.DoubleSqueezeConfig(policy={"block.1.*": "sign", "role:bias": "dense", "role:matrix": "int8"})
    pol = TensorPolicy(cfg.policy)
    infos = _infos(Tiny())
    got = {n: (r.label if (r := pol.rule_for(n, i)) else None) for n, i in infos.items()}
    assert got == {"tok.weight": None, "block.0.weight": None, "block.0.bias": None, "block.1.weight": "sign",
                   "block.1.bias": "sign", "block.3.weight": "int8", "block.3.bias": "dense", "norm.weight": None,
                   "lm_head.weight": None}
    pol.check(list(infos.values()))                  # every rule matches something
    with pytest.raises(PolicyError, match="policy pattern 'blocks.\\*' matches no parameter of the model "
                                          "\\(9 parameters: tok.weight, block.0.weight"):
        TensorPolicy(dsq.DoubleSqueezeConfig(policy={"blocks.*": "sign"}).policy).check(list(infos.values()))
    with pytest.warns(UserWarning, match="no parameter of the model has role 'head'"):
        mlp = nn.Sequential(nn.Conv1d(4, 4, 3), nn.LayerNorm(4))        # no nn.Linear: no head
        TensorPolicy(dsq.DoubleSqueezeConfig(policy={"role:head": "int8"}).policy).check(
            list(_infos(mlp).values()))
    unnamed = [TensorInfo(None, (8,), roles_from_shape((8,)), named=False)]
    TensorPolicy(dsq.DoubleSqueezeConfig(policy={"role:norm": "dense"}).policy).check(unnamed, complete=False)
    for policy, what in [({"role:embedding": "int8"}, "role 'embedding'"), ({"fc.*": "int8"}, "name pattern")]:
        with pytest.raises(PolicyError, match=f"{what}.*needs the parameters' names.*module=model"):
            TensorPolicy(dsq.DoubleSqueezeConfig(policy=policy).policy).check(unnamed, complete=False)


def test_collective_routes_each_tensor_to_its_rule_against_the_simulator():
    """Three tensors of one reduction on 2 in-process ranks: an embedding under its rule's int8, a norm under
    "dense", a matrix under the config's topk; each equals a Simulator with that compressor, step by step."""
    cfg = dsq.DoubleSqueezeConfig(compressor="topk:0.1", policy={"role:embedding": "int8", "role:norm": "dense"},
                                  block_size=64, min_numel=8, guard=0.0)
    infos = {"emb": TensorInfo("emb", (40, 8), frozenset({Role.EMBEDDING})),
             "ln": TensorInfo("ln", (32,), frozenset({Role.NORM})),
             "w": TensorInfo("w", (20, 10), frozenset({Role.MATRIX}))}
    sizes = {"emb": 320, "ln": 32, "w": 200}
    world = dsq.ThreadWorld(2)
    gen = torch.Generator().manual_seed(0)
    steps = [[{k: torch.randn(n, generator=gen) for k, n in sizes.items()} for _ in range(2)] for _ in range(4)]

    def body(comm):
        col = dsq.DoubleSqueezeCollective(cfg, comm, tensor_info=infos.get)
        outs = []
        for grads in steps:
            outs.append(col.reduce([(k, grads[comm.rank][k].clone()) for k in sizes]))
            col.finish_step()
        return outs, col.policy_report()
    results = world.run(body)
    assert results[0][1]["tensors"] == {"emb": "int8", "ln": "dense"}
    for i, (key, spec) in enumerate([("emb", "int8"), ("ln", None), ("w", "topk:0.1")]):
        sim_cfg = dsq.DoubleSqueezeConfig(compressor=spec or "topk:0.1", block_size=64, guard=0.0,
                                          min_numel=10**9 if spec is None else 8)
        sim = dsq.Simulator(2, sim_cfg, key=key)
        for t, grads in enumerate(steps):
            want = sim.step([g[key] for g in grads])
            for r in range(2):
                torch.testing.assert_close(results[r][0][t][i], want, rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{key} step {t} rank {r}: {m}")


def test_collective_without_tensor_info_refuses_a_policy():
    cfg = dsq.DoubleSqueezeConfig(policy={"role:norm": "dense"}, min_numel=8, block_size=64)

    def body(comm):
        with pytest.raises(PolicyError, match="without tensor_info"):
            dsq.DoubleSqueezeCollective(cfg, comm).reduce([("x", torch.ones(64))])
    dsq.ThreadWorld(1).run(body)
