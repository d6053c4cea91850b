"""The commands' entry point: absl's ``app.run``, except that

* a usage error (a missing or contradictory flag) prints one line, where
  absl prints the whole help after it;
* ``--help`` (and ``-h``, ``--helpshort``, ``--helpfull``) exits 0 after
  printing the flags, where absl exits 1 (commands import TensorFlow inside
  ``main``, so help prints at once);
* TensorFlow's native start-up lines (oneDNN and CUDA notices, the failed
  ``cuInit`` of a machine without a GPU, absl's pre-initialisation warning,
  and Beam's note on Google Cloud clients at import)
  are dropped from stderr unless ``--verbose`` is given: they are written
  before ``TF_CPP_MIN_LOG_LEVEL`` takes effect, so only a filter on the
  file descriptor removes them. Everything else passes through at once.
"""

import atexit
import os
import re
import sys
import threading

HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")

NATIVE_NOISE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|[IW]\d{4} [\d:.]+ +\d+ \w+\.(?:cc|cpp|h):\d+\] "  # native INFO and WARNING lines (not Python's absl logs)
    rb"|E\d{4} [\d:.]+ +\d+ cuda\w*\.cc:\d+\] "  # CUDA's errors where there is no GPU
    rb"|To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags"
    rb"|.*\bapitools not found, and bigquery client libraries are not available)"  # Beam's import, any format
)


def _filter_native_stderr():
    """Routes file descriptor 2 through a thread that drops `NATIVE_NOISE`
    lines; restored at exit, with what is still in the pipe forwarded."""
    read_end, write_end = os.pipe()
    real = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump():
        with os.fdopen(read_end, "rb", buffering=0) as source:
            while True:
                chunk = source.read(1 << 16)
                if not chunk:
                    return
                kept = b"".join(line for line in chunk.splitlines(keepends=True) if not NATIVE_NOISE.match(line))
                if kept:
                    os.write(real, kept)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()

    def restore():
        sys.stderr.flush()
        os.dup2(real, 2)  # the pipe's last write end here closes: the pump drains it and stops
        thread.join(timeout=2)

    atexit.register(restore)


def _one_line(error):
    """An exception as its message (OSError: the reason and the file)."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    return str(error)


def run(main, pass_through=False):
    """``absl.app.run(main)``, with help exiting 0, native start-up noise
    dropped (see the module docstring), and a ValueError or OSError from
    ``main`` printed as one ``error: ...`` line with exit status 1 (usage
    errors too, pointing to ``--help``). With ``pass_through``, arguments
    that are not this command's flags reach ``main``'s ``argv`` unchanged
    (another parser's options, such as Beam's), instead of being refused."""
    from absl import app, flags

    if "verbose" not in flags.FLAGS:
        flags.DEFINE_boolean("verbose", False, "Show TensorFlow's native start-up log lines on stderr.")
    verbose = any(arg in ("--verbose", "--verbose=true", "--verbose=1") for arg in sys.argv[1:])
    if not verbose:
        import logging

        _filter_native_stderr()
        logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader's INFO lines (which build it loaded)
    asked = any(arg.split("=", 1)[0] in HELP_FLAGS for arg in sys.argv[1:])

    def checked(argv):
        try:
            return main(argv)
        except app.UsageError as e:
            print(f"error: {e} (see --help)", file=sys.stderr)
            return 1
        except (ValueError, OSError) as e:  # what the library raises for bad input: one line, never a traceback
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return 1

    def known_only(argv):
        try:
            return flags.FLAGS(argv, known_only=True)
        except flags.Error as e:
            print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
            sys.exit(1)

    try:
        app.run(checked, flags_parser=known_only) if pass_through else app.run(checked)
    except SystemExit as e:
        if asked and e.code == 1:
            sys.exit(0)
        raise
