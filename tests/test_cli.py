import subprocess
import sys

import pytest

COMMANDS = ["training.evaluate", "training.clean", "training.visualize_proposals", "export.export_saved_model",
            "export.import_checkpoint", "serving.server", "serving.extract", "serving.index", "serving.search",
            "serving.load_test"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_explains_the_flags_and_exits_0(command):
    result = subprocess.run([sys.executable, "-m", command, "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-500:]
    assert "flags:" in result.stdout and "--" in result.stdout


def test_a_bad_flag_still_fails():
    result = subprocess.run([sys.executable, "-m", "serving.index", "--no_such_flag"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0 and "no_such_flag" in result.stderr
