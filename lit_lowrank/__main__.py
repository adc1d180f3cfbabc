"""``python -m lit_lowrank``: the command line (see :mod:`lit_lowrank.cli`)."""

from lit_lowrank.cli import main

if __name__ == "__main__":
    main()
