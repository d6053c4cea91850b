import dataclasses
import subprocess
import sys

from absl import flags

from deep_retrieval import config as config_lib
from deep_retrieval.presets import PRESETS
from training import config_flags


def _values(argv):
    fv = flags.FlagValues()
    config_flags.define_flags(fv)
    fv(["prog"] + argv)
    return fv


def test_every_field_has_a_flag():
    fv = _values([])
    names = set(fv)
    for f in dataclasses.fields(config_lib.TrainConfig):
        if f.name not in config_flags.NESTED:
            assert f.name in names
    for f in dataclasses.fields(config_lib.DescriptorConfig):
        assert f.name in names
    for f in dataclasses.fields(config_lib.SyntheticConfig):
        assert "synthetic_" + f.name in names
    for cls in (config_lib.TrainConfig, config_lib.DescriptorConfig, config_lib.SyntheticConfig,
                config_lib.CleanConfig):
        for f in dataclasses.fields(cls):  # documented where declared; that text is the help
            assert f.name in config_flags.NESTED or len(f.metadata["help"]) > 10, (cls, f.name)
    assert fv["margin"].help.startswith("triplet ranking margin m.")


def test_steps_are_whole_mining_rounds():
    import pytest

    with pytest.raises(ValueError, match="multiple of `mine_every`"):
        config_flags.config_from_flags(_values(["--preset=paper", "--steps=5"]))


def test_preset_and_overrides():
    assert config_flags.config_from_flags(_values([])) == PRESETS["demo"]()
    cfg = config_flags.config_from_flags(_values([
        "--preset=paper", "--steps=32", "--scales=1,0.5", "--whitening_dim=none",
        "--weights=none", "--synthetic_seed=3", "--resume", "--margin=0.2",
    ]))
    paper = PRESETS["paper"]()
    assert cfg.steps == 32 and cfg.margin == 0.2 and cfg.resume is True
    assert cfg.descriptor.scales == (1.0, 0.5) and cfg.descriptor.whitening_dim is None
    assert cfg.descriptor.weights is None and cfg.descriptor.backbone == "resnet101"
    assert cfg.synthetic.seed == 3 and cfg.image_size == paper.image_size


def test_help_explains_fields():
    result = subprocess.run([sys.executable, "-m", "training.train", "--help"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0  # deep_retrieval.cli: help exits 0 (absl alone exits 1)
    assert "--mine_every: steps between hard-negative mining rounds" in result.stdout
    assert "--preset" in result.stdout and "--synthetic_label_noise" in result.stdout
