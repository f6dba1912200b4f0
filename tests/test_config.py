import pytest

from qdiff import CalibConfig, ConfigError, QConfig, QuantSpec, ReconConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 1}, "out of range; use 2–16"),
        ({"bits": 17}, "out of range"),
        ({"bits": 4.0}, "must be an integer"),
        ({"bits": 4, "granularity": "row"}, "granularity='row' is not valid; choose one of tensor, channel"),
        ({"bits": 4, "scale_search": "kl"}, "choose one of minmax, mse"),
        ({"bits": 4, "p": 0}, "p=0 must be > 0"),
    ],
)
def test_quantspec_validation(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QuantSpec(**kwargs)


def test_other_config_validation():
    with pytest.raises(ConfigError, match="choose one of uniform, normal, final"):
        CalibConfig(strategy="random")
    with pytest.raises(ConfigError, match="num_timesteps=0 must be > 0"):
        CalibConfig(num_timesteps=0)
    with pytest.raises(ConfigError, match="choose one of none, brecq"):
        ReconConfig(method="adaround")
    with pytest.raises(ConfigError, match="warmup"):
        ReconConfig(warmup=1.5)
    with pytest.raises(ConfigError, match=r"act\.granularity must be 'tensor'"):
        QConfig(act=QuantSpec(8, granularity="channel"))
    with pytest.raises(ConfigError, match=r"attn_act\.granularity must be 'tensor'"):
        QConfig(attn_act=QuantSpec(8, True, granularity="channel"))
    with pytest.raises(ConfigError, match="quantizes nothing"):
        QConfig(weight=None, act=None)
    with pytest.raises(ConfigError, match="must be a QuantSpec"):
        QConfig(weight={"bits": 4})


def test_yaml_round_trip():
    cfg = QConfig(
        weight=QuantSpec(4, True, "channel", "mse"),
        act=None,
        attn_probs=QuantSpec(16),
        attn_act=QuantSpec(8, symmetric=True),
        calib=CalibConfig(strategy="normal", num_timesteps=7),
        recon=ReconConfig(weight_iters=123, granularity="layer"),
    )
    text = cfg.to_yaml()
    assert "num_timesteps: 7" in text
    assert QConfig.from_yaml(text) == cfg
    assert QConfig.from_yaml(QConfig().to_yaml()) == QConfig()


def test_from_dict_names_unknown_fields_and_valid_ones():
    with pytest.raises(ConfigError, match=r"QConfig.weight: unknown field\(s\) nbits; valid: bits"):
        QConfig.from_dict({"weight": {"nbits": 4}})
    with pytest.raises(ConfigError, match="does not parse"):
        QConfig.from_yaml("weight: [")
    with pytest.raises(ConfigError, match="must be a mapping"):
        QConfig.from_yaml("- 1")


def test_transforms_round_trip_and_bad_ones_are_named():
    from qdiff import LowRank, Smooth

    cfg = QConfig(transforms=(Smooth(0.3), LowRank(8)))
    text = cfg.to_yaml()
    assert "kind: smooth" in text and "kind: low_rank" in text
    assert QConfig.from_yaml(text) == cfg
    unknown = (
        r"transforms\[0\]: unknown transform 'smoth' \(did you mean 'smooth'\?\); valid: low_rank, smooth"
    )
    with pytest.raises(ConfigError, match=unknown):
        QConfig.from_dict({"transforms": [{"kind": "smoth", "alpha": 0.5}]})
    with pytest.raises(ConfigError, match=r"Smooth\.alpha=1\.5 must be a number in"):
        Smooth(1.5)
    with pytest.raises(ConfigError, match=r"LowRank\.rank=0 must be an integer >= 1"):
        LowRank(0)
    with pytest.raises(ConfigError, match="tuple of qdiff transforms"):
        QConfig(transforms=(0.5,))
