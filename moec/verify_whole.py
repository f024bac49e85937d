"""An out-of-core artifact run end to end by ONNX Runtime, when it can hold it: the check after the layer-by-layer one.

Layer-by-layer verification (moec.verify_layers) runs the artifact one segment at a time; this runs the whole
graph in one session, as a user's runtime will, on the same probe inputs, and compares its outputs with the
eager reference's and with the segmented run's. It runs in a child process (`python -m moec.verify_whole`):
the session holds the whole artifact, and the compile's own memory stays bounded by its largest layer; the
child's peak resident memory is reported beside the result.

The session runs with prepacking off: ONNX Runtime would otherwise hold prepacked copies beside the weights
(measured: 12.9 GB for an int4 OLMoE-1B-7B artifact of 4.8 GiB). It runs when the artifact's weights, a quarter
over for the session's own buffers, fit in the memory available (`fits`); otherwise the report says it was
skipped and why. A bf16 artifact runs widened to fp32 (moec.widen_bf16: the CPU provider has no bf16 kernels),
which takes about twice its weights' bytes. A session that fails to load or run the artifact
is a failure of the compile (its error is shown); a child killed by SIGKILL (the kernel's OOM killer) is
reported as not run, any other signal (an abort, a crash) as a failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

PROVIDERS = ["CPUExecutionProvider"]
HEADROOM = 1.25  # the session's bytes over its weights' (arena, activations, the graph), prepacking off
WIDENED_HEADROOM = 2 * HEADROOM + 0.5  # the fp32 copy the session computes with, and one tensor's bf16 being read
MARGIN = 512 << 20


@dataclass
class WholeRun:
    ran: bool
    why: str = ""  # why it did not run
    rel_l2: Optional[float] = None  # the worst output, against the eager reference
    vs_segmented: Optional[float] = None  # the worst output, against the layer-by-layer run of the same artifact
    peak_rss_bytes: Optional[int] = None  # the child's
    outputs: list[dict[str, float]] = field(default_factory=list)  # per probe: output -> relative L2 vs eager

    def passed(self, tolerance: float) -> bool:
        return not self.ran or (self.rel_l2 is not None and self.rel_l2 <= tolerance)

    def to_dict(self) -> dict:
        d = {"ran": self.ran}
        if not self.ran:
            d["why"] = self.why
            return d
        d.update(rel_l2=self.rel_l2, vs_segmented=self.vs_segmented, peak_rss_bytes=self.peak_rss_bytes,
                 inputs=self.outputs)
        return d


def fits(weights_bytes: int, available: Optional[int], widened: bool = False) -> tuple[bool, str]:
    """`widened`: a bf16 artifact, run as fp32 (moec.widen_bf16): the session computes on an fp32 copy of its weights."""
    need = int(weights_bytes * (WIDENED_HEADROOM if widened else HEADROOM)) + MARGIN
    if available is None:
        return False, "the memory available could not be read"
    if need > available:
        return False, (f"one ONNX Runtime session over the whole artifact needs about {need / 2**30:.1f} GiB; "
                       f"{available / 2**30:.1f} GiB are available")
    return True, ""


def run_whole(model_path: str, probes: list, tolerance: float) -> WholeRun:
    """`probes`: verify_layers' ProbeResults (feeds, the segmented run's outputs, the eager reference's)."""
    import torch

    from moec.errors import VerificationError
    from moec.numerics import compare_tensors

    with tempfile.TemporaryDirectory(prefix="moec-whole-") as tmp:
        for i, p in enumerate(probes):
            np.savez(os.path.join(tmp, f"feeds{i}.npz"), **p.feeds)
        proc = subprocess.run([sys.executable, "-m", "moec.verify_whole", model_path, tmp, str(len(probes)),
                               ",".join(PROVIDERS)],
                              capture_output=True, text=True)
        if proc.returncode == -signal.SIGKILL:  # the kernel's OOM killer: memory ran short, nothing is known
            return WholeRun(False, "the session's process was killed (SIGKILL: out of memory?)")
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}, no message"]
            raise VerificationError(f"ONNX Runtime could not run the whole artifact in one session ({model_path}): "
                                    f"{tail[0][:500]}")
        peak = json.loads(open(os.path.join(tmp, "peak.json")).read())["peak_rss_bytes"]
        worst, worst_seg, rows = 0.0, 0.0, []
        for i, p in enumerate(probes):
            with np.load(os.path.join(tmp, f"outputs{i}.npz")) as got:
                row = {}
                for name, expected in p.expected.items():
                    row[name] = float(compare_tensors(torch.from_numpy(expected), torch.from_numpy(got[name])).rel_l2)
                    seg = compare_tensors(torch.from_numpy(p.outputs[name]), torch.from_numpy(got[name])).rel_l2
                    worst, worst_seg = max(worst, row[name]), max(worst_seg, float(seg))
                rows.append(row)
    return WholeRun(True, rel_l2=worst, vs_segmented=worst_seg, peak_rss_bytes=peak, outputs=rows)


def main(argv: list[str]) -> int:
    import onnx
    import onnxruntime as ort

    from moec.heap import peak_rss
    from moec.widen_bf16 import has_bf16, widened_session

    model_path, tmp, n, providers = argv[0], argv[1], int(argv[2]), argv[3].split(",")
    def new_options():
        options = ort.SessionOptions()
        options.add_session_config_entry("session.disable_prepacking", "1")  # the weights held once, not ~2.5 times
        return options

    head = onnx.load(model_path, load_external_data=False)
    if has_bf16(head):  # no bf16 kernels on the CPU provider: the whole graph widened to fp32 (moec.widen_bf16)
        widened = widened_session(head, os.path.dirname(os.path.abspath(model_path)), new_options, providers)
        session = widened.session
    else:
        session = ort.InferenceSession(model_path, new_options(), providers=providers)
    names = [o.name for o in session.get_outputs()]
    for i in range(n):
        with np.load(os.path.join(tmp, f"feeds{i}.npz")) as feeds:
            outs = session.run(None, {k: feeds[k] for k in feeds.files})
        np.savez(os.path.join(tmp, f"outputs{i}.npz"), **dict(zip(names, outs)))
    with open(os.path.join(tmp, "peak.json"), "w") as f:
        json.dump({"peak_rss_bytes": peak_rss()}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
