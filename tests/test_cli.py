import subprocess
import sys

import pytest

COMMANDS = ["training.evaluate", "training.clean", "training.visualize_proposals", "export.export_saved_model",
            "export.import_checkpoint", "serving.server", "serving.extract", "serving.index", "serving.search",
            "benchmarks.load_test", "serving.web", "serving.beam_extract", "training.train"]

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


def test_only_native_start_up_lines_are_noise():
    from deep_retrieval.cli import NATIVE_NOISE

    noise = [  # as TensorFlow 2.21 prints them on a CPU machine
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1764750000.123456   12345 port.cc:153] oneDNN custom operations are on.",
        "E0000 00:00:1764750000.234567   12345 cuda_executor.cc:1309] failed call to cuInit: INTERNAL: CUDA error",
        "W0000 00:00:1764750000.345678   12345 gpu_device.cc:2342] Cannot dlopen some GPU libraries.",
        "To enable the following instructions: AVX512F AVX512_BF16, in other operations, rebuild TensorFlow "
        "with the appropriate compiler flags.",
        "WARNING:root:apitools not found, and bigquery client libraries are not available despite the import "
        "not raising an ImportError.",
        "W1203 10:07:26.200019 139723704589184 __init__.py:32] apitools not found, and bigquery client libraries "
        "are not available despite the import not raising an ImportError.",
    ]
    kept = [  # Python's absl logging uses the same prefix, with a .py file: the commands' own messages
        "I1203 09:40:00.123456 140000 server.py:132] stopping: draining requests in flight",
        "W1203 09:40:00.123456 140000 extract.py:20] retrying",
        "E0000 00:00:1764750000.234567   12345 op_kernel.cc:1857] OP_REQUIRES failed: Invalid JPEG data",
        "error: model.keras: no such file",
    ]
    assert all(NATIVE_NOISE.match(line.encode()) for line in noise)
    assert not any(NATIVE_NOISE.match(line.encode()) for line in kept)


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


@pytest.mark.parametrize("error, line", [
    ('ValueError("descriptors.parquet: no column image")', "error: descriptors.parquet: no column image"),
    ('OSError(28, "No space left on device", "index/lists.ivfdata")',
     "error: index/lists.ivfdata: No space left on device"),
])
def test_a_library_error_is_one_line_and_exit_1(error, line):
    code = ("from deep_retrieval import cli\n"
            f"def main(argv):\n    raise {error}\n"
            "cli.run(main)\n")
    result = subprocess.run([sys.executable, "-c", code, "--noverbose"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [line]  # no traceback
