import subprocess
import sys

import pytest

COMMANDS = ["training.evaluate", "training.clean", "training.visualize_proposals", "export.export_saved_model",
            "export.import_checkpoint", "serving.server", "serving.extract", "serving.index", "serving.search",
            "serving.load_test", "serving.web", "training.train"]

PROBE = """
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
print("TENSORFLOW LOADED" if "tensorflow" in sys.modules else "no tensorflow", code, file=sys.stderr)
"""


@pytest.mark.parametrize("command", COMMANDS)
def test_help_explains_the_flags_and_exits_0(command):
    result = subprocess.run([sys.executable, "-m", command, "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-500:]
    assert "flags:" in result.stdout and "--" in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_help_prints_before_tensorflow_loads(command):
    result = subprocess.run([sys.executable, "-c", PROBE, command], capture_output=True, text=True, timeout=300)
    assert result.stderr.strip().splitlines()[-1] == "no tensorflow 0", result.stderr[-500:]


def test_a_bad_flag_still_fails():
    result = subprocess.run([sys.executable, "-m", "serving.index", "--no_such_flag"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0 and "no_such_flag" in result.stderr


def test_native_start_up_lines_are_dropped_unless_verbose(tmp_path):
    from deep_retrieval.cli import NATIVE_NOISE

    missing = str(tmp_path / "missing.keras")
    command = [sys.executable, "-m", "training.evaluate", "--model", missing, "--data_root", str(tmp_path),
               "--dataset", "nothing"]
    quiet = subprocess.run(command, capture_output=True, text=True, timeout=300)
    loud = subprocess.run(command + ["--verbose"], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == loud.returncode == 1
    assert not [line for line in quiet.stderr.splitlines() if NATIVE_NOISE.match(line.encode())], quiet.stderr
    assert quiet.stderr.strip().splitlines()[-1].startswith("error: ")
    assert [line for line in loud.stderr.splitlines() if NATIVE_NOISE.match(line.encode())], loud.stderr
