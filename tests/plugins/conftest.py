"""Triton kernels run on this CPU-only machine through Triton's interpreter.

On a GPU host, `MOEC_KERNEL_TESTS_ON_GPU=1 pytest tests/plugins` runs the same tests compiled for
the GPU instead (the tests then put their tensors on the GPU).
"""

import os

ON_GPU = os.environ.get("MOEC_KERNEL_TESTS_ON_GPU") == "1"
# Must be set before triton decorates the kernels (moec.plugins.* is imported by the tests below).
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
