"""moec: compile Mixture-of-Experts PyTorch models into verified deployment artifacts.

    import moec
    result = moec.compile(model, (example_input,), out="artifact/")

See README.md for the command line (`moec compile`) and the artifacts it writes.
"""

from __future__ import annotations

from typing import Any, Optional

from moec.errors import MoecError


def compile(module=None, example_args: Optional[tuple] = None, dynamic_shapes: Any = None, *,
            out: Optional[str] = None, source: Optional[str] = None, **options):
    """Compile `module` (with example args) or a SOURCE string into `out`; returns a CompileResult.

    Keyword options are those of moec.pipeline.CompileOptions (target, force, triton_repo, ...).
    """
    from moec.pipeline import CompileOptions, compile as _compile

    if out is None:
        raise MoecError("moec.compile needs out=DIR: the directory the artifact is written to.")
    return _compile(module, example_args, dynamic_shapes, source=source, options=CompileOptions(out=out, **options))


__all__ = ["compile", "MoecError"]
