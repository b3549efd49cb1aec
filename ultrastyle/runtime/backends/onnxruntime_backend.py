"""The ONNX Runtime runner: a bundle's graphs, one session per network, loaded on first use.

Session settings (measured in benchmarks/ort_settings.py):
- ``intra_op_num_threads``: the physical cores (ORT's default) unless given;
- graph optimisation ``ORT_ENABLE_ALL``;
- ``enable_mem_pattern`` off: tiles change shape, and a memory pattern is only
  reused for one shape;
- one CPU arena shared by all sessions of the process (an environment
  allocator), extending by what is requested (``kSameAsRequested``) instead of
  doubling: with one arena per session, ten stage networks each kept their own
  peak (2.9 GB at 2 MP in benchmarks/tiled_scaling.py); shared, 1.1 GB at 2 MP
  and 2.2 GB at 16 MP with a 1 GB budget, and flat over rounds of varied tile
  shapes (tests/test_backends.py). Over many large tiles it still fragments
  (3.5 GB at 40 MP), so the tiled pipeline calls `release_memory`, which
  shrinks it once the process has grown by more than its share of the budget
  since the last shrink (`cache_share`; run H, half the budget: 40 MP 1.76 GB
  at 18-40% more time); ``arena="shrink"`` (give chunks back after every run)
  runs 3x slower, ``arena="off"`` 1.7x slower;
- I/O binding on the CPU: outputs are written straight into numpy buffers that
  torch then shares, so no output is copied.

The arena's chunks come from glibc's malloc. Once the heap keeps freed memory
(`runtime.memory.keep_freed_memory`, which the command line applies), chunks
the arena releases stay in the heap for its next growth until the tiled
pipeline trims the heap, and the host-side arrays around each run stop
faulting in fresh pages: 8 MP, 3.57 -> 2.67 s/MP (benchmarks/README.md, runs J and R).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ultrastyle.core.traits import RunnerTraits
from ultrastyle.errors import Placeholder, Remedy, Setting, remedied
from ultrastyle.export.bundle import Bundle, BundleError, read_bundle
from ultrastyle.export.int8 import calibrate_more, int8_networks
from ultrastyle.runtime.backends.base import Runner, RunnerError, bundle_stages, parse_network
from ultrastyle.runtime.memory import resident_bytes, trim_heap

if TYPE_CHECKING:
    import onnxruntime


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - a base dependency
        raise RunnerError("the onnxruntime backend needs the onnxruntime package: pip install onnxruntime") from exc
    return ort


def providers_for(device: str) -> list[str]:
    """Execution providers for ``device``: the CPU's alone, or CUDA's first (onnxruntime-gpu on a GPU).

    ORT's TensorRT provider is not chosen here: it would build an engine per
    tile shape; TensorRT gets its own runner (`tensorrt_backend`).
    """
    if device == "cpu":
        return ["CPUExecutionProvider"]
    ort = _import_ort()
    if "CUDAExecutionProvider" not in ort.get_available_providers() or not (torch.cuda.is_available() or _cuda_device_present()):
        raise remedied(RunnerError(
            "device='cuda' with the onnxruntime backend needs the onnxruntime-gpu package and a CUDA GPU; "
            "use the torch backend on CUDA, or run on the CPU (device='cpu')"
        ), (Setting("device", "cuda"), Setting("device", "cpu")))
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _cuda_device_present() -> bool:
    import ctypes

    from ultrastyle.trt.env import libcuda  # Windows' nvcuda.dll too

    cuda = libcuda()
    if cuda is None:
        return False
    count = ctypes.c_int(0)
    return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


# Peak tile memory over the planner's estimate, measured per stage network on
# 1024 x 1024 tiles in fresh processes (ORT 1.31, CPU): stage 1's 24-channel
# full-resolution tensors get NCHWc copies padded to 32 channels. Stages 2-5:
# 1.1 alone; 1.25 leaves room for the host arrays the heap keeps around a tile
# (`memory.keep_freed_memory`): at 1.1 a 40 MP run peaked at 1.94 GiB in stage 4.
MEMORY_FACTOR = {1: 1.5}
MEMORY_FACTOR_DEFAULT = 1.25

# Stages whose decoders run with the map folded into their first conv. Measured
# in the tiled pipeline at 8 MP (ORT 1.31, 2 cores): stage 1's decoder 0.12 ->
# 0.075 s/MP (its full-resolution MatMul and layout copies go away); stages
# 2-5 gain nothing measurable (within +-15% run-to-run noise): a conv whose
# weights are a graph input cannot use ORT's prepacked weights.
FOLDED_STAGES = (1,)
PRECISIONS = ("fp32", "int8")  # int8: the bundle's Q/DQ graphs (`ultrastyle calibrate`)
# On x86 CPUs without VNNI (AVX2, AVX-512 before VNNI) ONNX Runtime's u8 x s8 int8 convolutions add pairs of products
# in 16 bits (VPMADDUBSW), which saturates. Measured on an AMD EPYC with AVX2 only: stage 1's int8 features 18.7% off
# float32 (tests/test_calibration.py; 15% tolerance, met on VNNI CPUs) and the QAT simulation far from ORT's output.
# This session setting (ORT's kOrtSessionOptionsAvx2PrecisionMode) makes ORT convert the weights and run exact
# u8 x u8 products there; the graphs and their scales are unchanged.
EXACT_INT8 = ("session.x64quantprecision", "1")

_SHARED_ARENA = False


def _register_shared_arena(ort) -> None:
    """One CPU arena for every session in this process (registered once)."""
    global _SHARED_ARENA
    if _SHARED_ARENA:
        return
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    cfg = ort.OrtArenaCfg({"max_mem": 0, "arena_extend_strategy": 1})  # 1: kSameAsRequested
    try:
        ort.create_and_register_allocator(info, cfg)
    except Exception as exc:  # noqa: BLE001 - already registered by another user of ORT in this process
        if "already" not in str(exc).lower():
            raise
    _SHARED_ARENA = True


class OnnxRuntimeRunner(Runner):
    """Runs a bundle's networks with ONNX Runtime."""

    backend = "onnxruntime"

    def __init__(
        self,
        bundle: Bundle | str,
        *,
        providers: list[str] | None = None,
        threads: int = 0,
        io_binding: bool = True,
        arena: str = "shared",
        precision: str = "fp32",
        spinning: bool = False,
        stages: tuple[int, ...] | None = None,
        device_id: int = 0,
    ) -> None:
        """``stages``: the stages it runs (default: every stage of the bundle; a bundle may hold more). ``device_id``:
        the GPU of the CUDA provider (``cuda:N``)."""
        if arena not in ("shared", "shrink", "off"):
            raise RunnerError(f"arena must be 'shared', 'shrink' (after every run) or 'off', got {arena!r}")
        if precision not in PRECISIONS:
            raise RunnerError(f"the onnxruntime backend runs fp32 or int8 (Q/DQ graphs), not {precision!r}")
        self.arena = arena
        # Pool threads that spin after a run take the cores from the torch and numpy work between
        # runs (statistics, canvases): 2 MP tiled, 2 cores: spinning off 5.6-5.8 s vs 6.0-6.1 s.
        self.spinning = spinning
        self.bundle = bundle if isinstance(bundle, Bundle) else read_bundle(bundle)
        self.precision = precision
        self._int8: dict = {}
        if precision == "int8":
            try:
                self._int8 = int8_networks(self.bundle)
            except BundleError as exc:  # its remedy goes with it
                raise remedied(RunnerError(str(exc)), getattr(exc, "remedy", None)) from exc
            if not self._int8:
                fix = Remedy("calibrate", (str(self.bundle.path), Placeholder("YOUR_PHOTOS/")))
                raise remedied(RunnerError(f"bundle {self.bundle.path} has no int8 graphs; make them with {fix.python()}"), fix)
        super().__init__(self.bundle.model_name, self.bundle.arch, tuple(sorted(set(bundle_stages(self.bundle, stages)))))
        if self._int8:  # a stage calibration never reached would run in float32 without a word
            calibrated = sorted({parse_network(n)[1] for n in self._int8})
            if bare := [k for k in self.stages if k not in calibrated]:
                fix = calibrate_more(self.bundle, bare)
                raise remedied(RunnerError(
                    f"bundle {self.bundle.path} has int8 graphs for stage(s) {calibrated}, not for {bare}; "
                    f"calibrate those stages too ({fix.python()}), or run only stages {calibrated}"
                ), fix)  # fmt: skip
        self.providers = providers or providers_for("cpu")
        self.device_id = device_id
        self.threads = threads
        self.io_binding = io_binding and self.providers[0] == "CPUExecutionProvider"
        self._sessions: dict = {}
        self._rss_after_release: int | None = None

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # ORT copies to its GPU providers itself; tensors cross as host arrays

    @property
    def traits(self) -> RunnerTraits:
        on_cpu = self.providers[0] == "CPUExecutionProvider"
        return RunnerTraits(
            budget_memory="host" if on_cpu else "device",  # the CUDA provider's memory
            overlap_io=not on_cpu,  # a GPU computes while the host reads and writes tiles (`runtime.tile_io`)
            uniform_tiles=True,  # its arena keeps chunks per size: one tile shape per pass reuses them
            # Its arena reuses what it keeps: 40 MP, 1 GB budget: the whole budget 2.61 s/MP, 3/4 of it 3.37,
            # at the same 1.94 GiB peak (set by the largest tile, see MEMORY_FACTOR).
            cache_share=1.0,
            memory_factors=MEMORY_FACTOR,
            default_memory_factor=MEMORY_FACTOR_DEFAULT,
        )

    def decode(self, stage: int, features: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """decoder(A f + b): ``decoder_foldedK`` for the `FOLDED_STAGES`, where the bundle has it, else ``decoder_affineK``."""
        folded = f"decoder_folded{stage}"
        use_folded = (
            stage in FOLDED_STAGES and folded in self.bundle.manifest["networks"] and f"decoder_affine{stage}" not in self._int8
        )
        name = folded if use_folded else f"decoder_affine{stage}"
        return self.infer(name, {"features": features, "A": a, "b": b})["image"]

    def activate_impl(self) -> None:
        ort = _import_ort()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.enable_mem_pattern = False
        opts.log_severity_level = 3
        if self.providers[0] == "CPUExecutionProvider":
            if self.precision == "int8":
                opts.add_session_config_entry(*EXACT_INT8)
            if not self.spinning:
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if self.arena == "off":
                opts.enable_cpu_mem_arena = False
            else:
                _register_shared_arena(ort)
                opts.add_session_config_entry("session.use_env_allocators", "1")
        if self.threads:
            opts.intra_op_num_threads = self.threads
        self._options = opts
        self._run_options = ort.RunOptions()
        if self.arena == "shrink":  # hand unused arena chunks back after every run
            self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self._provider_options = [
            {"arena_extend_strategy": "kSameAsRequested", "device_id": str(self.device_id)} if p == "CUDAExecutionProvider" else {}
            for p in self.providers
        ]

    def deactivate_impl(self) -> None:
        if self._sessions:  # the arena is the process's, not the sessions': it kept its peak past close (0.8 MP: +300 MB)
            try:
                self.release_memory(0)
            except Exception:  # noqa: BLE001 - closing goes on: the memory is only kept longer
                pass
        self._sessions.clear()

    def release_memory(self, keep_bytes: int = 0) -> None:
        """Hand the arena's free chunks back to the OS between tile passes, once it holds more than ``keep_bytes``.

        The arena keeps every chunk it ever allocated, and each pass (another
        network, other tile shapes) asks for other sizes, so without this the
        process would hold the sum of all passes' peaks instead of the largest
        one. ORT shrinks an arena at the end of a run that asks for it, so a
        run on a tiny input does it here, before the next pass allocates.
        Shrinking costs time (the next pass faults its pages in again: +20%
        at 8 MP when done after every pass), so the arena is shrunk only when
        the resident set has grown by more than ``keep_bytes`` since the last
        shrink; measured at 8 MP with a 1 GB budget and ``keep_bytes`` 512 MB:
        4 shrinks instead of 11, the same 1.62 GiB peak. Before any shrink the
        growth counts from the first call with ``keep_bytes`` (as
        `memory.trim_heap`): shrinking there made a 2 MP image fault its
        arena in again in every stage.
        """
        if not self.is_active or self.arena == "off" or self.providers[0] != "CPUExecutionProvider":
            return
        if keep_bytes:
            if self._rss_after_release is None:
                self._rss_after_release = resident_bytes()
                return
            if resident_bytes() - self._rss_after_release <= keep_bytes:
                return
        stage = min(self.stages)
        side = 2 ** (stage + 1)  # the smallest input the stage's grid and reflection pads accept
        sess = self.session(f"encoder{stage}")
        options = _import_ort().RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        sess.run(None, {"image": np.zeros((1, 3, side, side), np.float32)}, options)
        trim_heap()  # the chunks went back to malloc, which may keep them (`memory.keep_freed_memory`)
        self._rss_after_release = resident_bytes()

    def session(self, network: str) -> onnxruntime.InferenceSession:
        """The network's InferenceSession, created on first use."""
        if network not in self._sessions:
            ort = _import_ort()
            if network not in self.bundle.manifest["networks"]:
                raise RunnerError(f"bundle {self.bundle.path} has no network {network!r}")
            # int8: the Q/DQ graph where calibration made one (some networks stay float on purpose).
            path = self._int8.get(network) or self.bundle.graph_path(network)
            try:
                self._sessions[network] = ort.InferenceSession(
                    str(path), self._options, providers=self.providers, provider_options=self._provider_options
                )
            except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types (InvalidProtobuf, Fail, ...)
                if type(exc).__module__.split(".")[0] != "onnxruntime":
                    raise
                if not path.is_file():  # deleted since the bundle was opened (`models remove`, another export): not a bad graph
                    raise RunnerError(f"{path}: the graph is gone, deleted after the model was opened (a model removed, a bundle "
                                      "exported or calibrated again?); open the model again") from None  # fmt: skip
                raise RunnerError(f"{path}: ONNX Runtime cannot load this graph ({' '.join(str(exc).split())}); export the model again") from None
        return self._sessions[network]

    def infer_impl(self, network: str, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        kind, stage = parse_network(network)
        sess = self.session(network)
        arrays = {k: _as_numpy(v) for k, v in feed.items()}
        out_name = sess.get_outputs()[0].name
        if not self.io_binding:
            return {out_name: torch.from_numpy(sess.run([out_name], arrays, self._run_options)[0])}
        # Bind inputs and a preallocated output: ORT writes into memory torch then shares.
        x = arrays["image" if kind == "encoder" else "features"]
        n, _, h, w = x.shape
        g = self.arch.grid(stage)
        if kind == "encoder":
            shape = (n, self.arch.feature_channels(stage), h // g, w // g)
        else:
            shape = (n, 3, h * g, w * g)
        out = np.empty(shape, np.float32)
        binding = sess.io_binding()
        for name, arr in arrays.items():
            binding.bind_cpu_input(name, arr)
        binding.bind_output(out_name, "cpu", 0, np.float32, list(shape), out.ctypes.data)
        sess.run_with_iobinding(binding, self._run_options)
        return {out_name: torch.from_numpy(out)}


def _as_numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t, dtype=np.float32)
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())
