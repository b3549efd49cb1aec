"""Errors that more than one layer raises.

`RunnerError` is the runner interface's error (`runtime.backends.base`),
and also what `trt` raises when TensorRT, a CUDA binding or a GPU is missing
(`trt.env.TensorRTUnavailable`): both import it from here, downward, so the
command line reports either the same way.
"""

from __future__ import annotations


class RunnerError(RuntimeError):
    """A runner used out of order, or a backend that cannot run here (says why and what to do)."""
