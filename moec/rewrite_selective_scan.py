"""rewrite_selective_scan: Mamba's selective scan captured as one scan op, not a Python loop over the sequence.

Matches: while torch.export captures a model, a function named ``mamba_selective_scan`` in the Python module
  of any of the model's layers: transformers' PyTorch version of mamba_ssm's ``selective_scan_fn`` (Jamba,
  Mamba, FalconMamba, Zamba). It runs the recurrence ``state = dA[t] * state + dBu[t]`` in
  ``for index in range(seq_len)``, which torch.export unrolls: the program holds one copy of the step per
  token of the example, so a dynamic seq fails with "Constraints violated (seq) ... specialized it to be a
  constant".
Produces: for the duration of the capture, the same function with the recurrence as torch's scan
  higher-order op -- one ``torch.ops.higher_order.scan`` node whose length is seq, which torch.onnx translates
  to an ONNX ``Scan``. Everything else (dt bias and softplus, the discretisation, the D skip, the
  silu(z) gate, the last state) is the original's arithmetic; the step does the loop body's operations in the
  same order on the same values, so eager outputs are bit-identical. The only change is the initial state's
  dtype: zeros in the state's own precision (the loop starts from zeros in the input's and promotes on the
  first step; ``dA * 0 + dBu`` is ``dBu`` either way), because a scan's carry keeps one dtype.
Refuses: a call with keyword arguments past the ones below (packed sequences' ``cu_seqlens``, ``seq_idx``) or
  with B or C not (batch, state, seq) goes to the original function unchanged. ``use_mambapy`` and
  ``use_associative_scan`` pick other algorithms for the same recurrence (the associative one is off while
  torch.export runs anyway); the scan computes that recurrence, so they change nothing here.
The function is replaced in its module's namespace, where its callers look it up, and put back afterwards;
so a capture in one thread changes it for every thread of the process while it runs.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

NAME = "rewrite_selective_scan"

FUNCTION = "mamba_selective_scan"

# transformers' version also takes these algorithm choices; any other keyword goes to the original
ALGORITHMS = {"use_mambapy", "use_associative_scan"}


@contextmanager
def selective_scan_as_scan_op(model: nn.Module) -> Iterator[list[str]]:
    """Within: the selective scans `model`'s layers call run as one scan op. Yields the names of the Python
    modules whose function was replaced (empty when none has one)."""
    replaced = []
    for module in {sys.modules.get(type(m).__module__) for m in model.modules()}:
        original = getattr(module, FUNCTION, None)
        if module is None or not callable(original):
            continue
        setattr(module, FUNCTION, _as_scan_op(original))
        replaced.append((module, original))
    try:
        yield sorted(module.__name__ for module, _ in replaced)
    finally:
        for module, original in replaced:
            setattr(module, FUNCTION, original)


def _as_scan_op(original):
    def selective_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, **kwargs):
        if set(kwargs) - ALGORITHMS or B.dim() != 3 or C.dim() != 3:
            return original(hidden_states, dt, A, B, C, D=D, z=z, delta_bias=delta_bias,
                            delta_softplus=delta_softplus, return_last_state=return_last_state, **kwargs)
        return scan_selective(hidden_states, dt, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

    return selective_scan


def scan_selective(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    """The selective scan of u (batch, channels, seq) with dt like u, A (channels, state) and B, C (batch, state,
    seq): y[t] = C[t] . h[t] with h[t] = exp(A dt[t]) h[t-1] + dt[t] B[t] u[t], h[-1] = 0; then y + D u and
    y * silu(z) where given. Each operation in the order transformers' loop does it, for identical values."""
    # the op itself, not torch's scan() wrapper: the wrapper compiles each call with torch.compile, whose cache
    # outlives the capture (a later capture can meet a frame specialised to an earlier one's batch size)
    from torch._higher_order_ops.scan import scan_op

    out_dtype = u.dtype
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    # (batch, channels, seq, state): the decay and the input of each step
    decay = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
    drive = dt[:, :, :, None] * B.transpose(1, 2)[:, None, :, :].float() * u[:, :, :, None].float()
    C = C.transpose(1, 2)  # (batch, seq, state)

    def step(state, decay_t, drive_t, c_t):
        state = decay_t * state + drive_t
        y = torch.matmul(state.to(out_dtype), c_t.unsqueeze(-1))
        return [state, y[:, :, 0]]

    batch, channels, _ = u.shape
    start = torch.zeros(batch, channels, A.shape[-1], dtype=torch.result_type(decay, drive), device=u.device)
    # the op scans dim 0 and stacks the outputs there: seq first in, seq last out (as the loop's stack)
    state, y = scan_op(step, [start], [decay.movedim(2, 0), drive.movedim(2, 0), C.movedim(1, 0)], ())
    y = y.movedim(0, -1)
    if D is not None:
        y = y + u * D[None, :, None]
    if z is not None:
        y = y * F.silu(z)
    return (y, state) if return_last_state else y
