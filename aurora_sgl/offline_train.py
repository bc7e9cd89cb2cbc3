"""`python -m aurora_sgl.offline_train`: train a draft head offline (see `aurora_sgl/training/offline.py`)."""

import sys

from aurora_sgl.training.offline import main

if __name__ == "__main__":
    sys.exit(main())
