import subprocess
import sys

import pytest

from deep_retrieval import config as config_lib
from deep_retrieval.presets import PRESETS


def test_configuration_is_a_leaf_module():
    code = ("import sys, deep_retrieval.config, deep_retrieval.presets; "
            "print(sorted(m for m in ('keras', 'tensorflow', 'jax', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-500:]


def test_presets_are_valid_and_fresh():
    assert sorted(PRESETS) == ["demo", "paper", "tiny"]
    for name, make in PRESETS.items():
        first, second = make(), make()
        assert isinstance(first, config_lib.TrainConfig) and first == second, name
        first.descriptor.levels += 1  # each call builds new objects: changing one leaves the preset alone
        assert make() == second, name


def test_invalid_settings_are_refused_when_built():
    for make, message in ((lambda: config_lib.DescriptorConfig(regions="boxes"), "regions"),
                          (lambda: config_lib.DescriptorConfig(scales=()), "scales"),
                          (lambda: config_lib.TrainConfig(batch_size=10, accumulate_steps=3), "accumulate_steps"),
                          (lambda: config_lib.TrainConfig(rpn_refresh_steps=5), "rpn_first"),
                          (lambda: config_lib.CleanConfig(ratio=1.5), "ratio")):
        with pytest.raises(ValueError, match=message):
            make()
