"""Triton kernels run on this CPU-only machine through Triton's interpreter."""

import os

# Must be set before triton decorates the kernels (moec.plugins.* is imported by the tests below).
os.environ["TRITON_INTERPRET"] = "1"
