import pytest

import dsq_plugins as dsq


def test_defaults_and_canonical_specs():
    c = dsq.DoubleSqueezeConfig(compressor=" topk:0.010 ")
    assert c.compressor == "topk:0.01" and c.server.spec == "topk:0.01"
    assert dsq.DoubleSqueezeConfig(server_compressor="none").server.spec == "none"
    assert dsq.DoubleSqueezeConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("kw,match", [
    ({"compressor": "nope"}, "valid names: .*sign.*topk"),
    ({"server_compressor": "topk:7"}, r"ratio must be a number in \(0, 1\]"),
    ({"worker_ef": 1}, "worker_ef must be True or False"),
    ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
    ({"min_numel": 2.5}, "min_numel must be an integer"),
    ({"bucket_mb": 0}, "bucket_mb must be a number > 0"),
    ({"block_size": 100}, "block_size must be a positive multiple of 8"),
    ({"block_size": 0}, "block_size must be a positive multiple of 8"),
])
def test_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        dsq.DoubleSqueezeConfig(**kw)


def test_unknown_key_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown DoubleSqueeze config key.*'compresor'.*valid keys: compressor"):
        dsq.DoubleSqueezeConfig.from_dict({"compresor": "sign"})


@pytest.mark.parametrize("spec,kw,roles", [
    ("qsgd:16", {}, ["worker", "server"]), ("randomk:0.1", {}, ["worker", "server"]),
    ("randomk:0.5", {"server_ef": False}, ["worker"]), ("qsgd:16", {"worker_ef": False}, ["server"]),
    ("randomk:0.05+int8", {}, ["worker", "server"]),
])
def test_divergent_error_feedback_warns_with_what_to_use(spec, kw, roles):
    """docs/RESULTS.md section 4: an unbiased compressor with variance >= |v|^2 under a residual diverges at every
    lr. Building such a config says so, for each pass concerned, and names what converges instead."""
    with pytest.warns(dsq.DivergenceWarning) as record:
        dsq.DoubleSqueezeConfig(compressor=spec, **kw)
    assert len(record) == 1
    text = str(record[0].message)
    for role in roles:
        assert f"on the {role} pass" in text and f"{role}_ef=False" in text
    assert "qsgd with at least 33 levels" in text and "sign" in text
    assert record[0].filename == __file__                   # it points at the line that built the config


@pytest.mark.parametrize("spec,kw", [("qsgd:33", {}), ("randomk:0.6", {}), ("sign", {}), ("topk:0.01+int4", {}),
                                     ("qsgd:16", {"worker_ef": False, "server_ef": False}),
                                     ("qsgd:16", {"block_size": 64})])
def test_contractive_configs_do_not_warn(spec, kw):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", dsq.DivergenceWarning)
        dsq.DoubleSqueezeConfig(compressor=spec, **kw)
