import os
import sys
from pathlib import Path

import torch

# Triton kernels run in Triton's interpreter on machines without a GPU; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The shared naive reference (tests/reference.py) is imported as a plain module.
sys.path.insert(0, str(Path(__file__).parent))
