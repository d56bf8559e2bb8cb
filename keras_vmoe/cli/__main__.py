"""`python -m keras_vmoe.cli`: how `--backend` restarts the command."""

import sys

from keras_vmoe.cli import main

if __name__ == "__main__":
    sys.exit(main())
