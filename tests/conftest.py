import os

import torch

# Without a GPU, Triton kernels run through Triton's interpreter; the variable must
# be set before any kernel is defined (i.e. before loraplex.kernels is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
