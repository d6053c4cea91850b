"""The commands' entry point: absl's ``app.run``, except that ``--help``
(and ``-h``, ``--helpshort``, ``--helpfull``) exits 0 after printing the
flags, where absl exits 1."""

import sys

HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def run(main):
    """``absl.app.run(main)``, with help exiting 0."""
    from absl import app

    asked = any(arg.split("=", 1)[0] in HELP_FLAGS for arg in sys.argv[1:])
    try:
        app.run(main)
    except SystemExit as e:
        if asked and e.code == 1:
            sys.exit(0)
        raise
