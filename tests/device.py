"""Where the kernel tests run: on the GPU when CUDA is there, else in Triton's interpreter on the CPU.

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports Triton when there is no CUDA
device. One test body then serves both: it puts its tensors on ``DEVICE`` (the ``device`` fixture of
``tests/conftest.py``), and its bounds hold for the compiled kernels and for the interpreter.

``needs_interpreter``: on a CPU, the kernels run only if ``triton`` was first imported under
``TRITON_INTERPRET=1`` (its ``tl.zeros``, ``tl.max`` ... are built at import); a test file whose tests
skip for this reruns itself in a fresh interpreted process (``test_whole_file_in_fresh_process``, the
only interpreter-only tests: skipped whenever ``IN_PROCESS``, so always on a GPU, where the same tests
ran compiled). On a GPU the kernels are compiled and the tests always run.
"""

from __future__ import annotations

import pytest
import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
INTERPRETED = isinstance(tl.zeros, InterpretedFunction)
# The kernel tests can run in this process: compiled on the GPU, or interpreted on the CPU.
IN_PROCESS = ON_GPU or INTERPRETED

needs_interpreter = pytest.mark.skipif(
    not IN_PROCESS, reason="triton was imported before TRITON_INTERPRET=1: test_whole_file_in_fresh_process runs these"
)
