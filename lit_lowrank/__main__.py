"""``python -m lit_lowrank``: the command line (see :mod:`lit_lowrank.commands`)."""

from lit_lowrank.commands import main

if __name__ == "__main__":
    main()
