"""Session-wide test settings.

Triton kernels run on the CPU through Triton's interpreter, which only takes effect
when ``TRITON_INTERPRET=1`` is set before ``triton`` is first imported: set it here,
before any test module imports a kernel.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
