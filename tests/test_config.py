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
