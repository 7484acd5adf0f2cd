"""Run Triton kernels through the interpreter when there is no GPU, as CI does."""

import importlib.util
import os

if importlib.util.find_spec("torch") is not None and "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
