"""incseg: the ML core of the incremental segmentation pipeline (no orchestration inside)."""

import os

__version__ = "0.1.0"

# Torch's CPU kernels run on GNU OpenMP, whose idle threads spin 300000 rounds before they sleep. Beside
# another busy process on a small machine they spin on the core it needs: a 96 px U-Net step then ran
# 5x slower on 2 threads than on 1 (6 against 30 images/s on 2 cores). A short spin keeps the free-machine
# speed (54-56 images/s either way) and matches one thread beside a busy process (28). Set before torch
# loads; a value of the user's own is kept (README: GOMP_SPINCOUNT).
os.environ.setdefault("GOMP_SPINCOUNT", "1000")
