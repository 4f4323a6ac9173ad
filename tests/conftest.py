import os

# Triton kernels run on the CPU through Triton's interpreter; the variable must be
# set before any kernel is defined (i.e. before loraplex.kernels is imported).
if not os.environ.get("CUDA_VISIBLE_DEVICES") and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
