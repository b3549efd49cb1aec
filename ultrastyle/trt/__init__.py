"""TensorRT engines for a bundle's stage networks, and what they need around them.

Nothing here imports ``tensorrt``, ``cuda`` or ``pycuda`` at import time: the
static check (`check`), profile and engine-folder logic (`profiles`,
`engines`) and the fp16 graph conversion (`fp16`) run on any CPU machine;
`build` and the runner (`ultrastyle.runtime.backends.tensorrt_backend`)
import TensorRT when they start.

Modules:
    env            what is installed and usable: TensorRT, cuda-python, pycuda, the GPU
    check          static TensorRT compatibility of a bundle (``ultrastyle build --check``)
    profiles       optimisation profiles from the tile planner's shapes
    engines        engine folders, their manifest, staleness
    graphs         which ONNX graph each engine is built from, per precision
    fp16           fp32 -> fp16 graph conversion (TensorRT 11 has no FP16 flag)
    build          building engines, TensorRT 10 and 11 by feature detection
    device_memory  a small device-memory interface, cuda-python and pycuda implementations
    memory_model   device bytes per tile pixel for each precision (the planner's factor)
"""

PRECISIONS = ("fp32", "fp16", "int8")
