"""Compile the Triton kernels that fused_gates launches for given inputs, for a CUDA target, on a machine without a
GPU, exactly as Triton's launcher would compile them on that GPU, and read each variant's resource usage.

How it works (nothing here knows the package's kernels, their names or their arguments):

* The inputs are CPU tensors that tell Python code they live on ``cuda:0`` (:class:`OnGpu`). A torch-function mode
  keeps every tensor the package creates on the CPU while it too reports ``cuda``, and ``torch.cuda``'s queries
  answer for an emulated device (:data:`DEVICES`: an A100 for sm_80, an H100 for sm_90), so the package's
  device-dependent host decisions (chunk sizes, vocabulary splits) take their GPU branch. Autograd runs on the CPU.
* A torch-dispatch mode replaces every operation on more than :data:`LARGE` elements (the lm_head products, the
  float32 logits buffers, dW, copies of the weight) by an uninitialised result of the right shape, strides and
  dtype: the real shapes (a 7B head: 545M weights) run in seconds and touch no memory. Views run for real, so
  storage offsets (and with them pointer alignment) are those of the GPU run. Small operations run for real, and
  small new tensors are zero-filled so that the O(N) host code sees finite numbers; an operation the CPU build
  lacks (``mm(..., out_dtype=float32)`` of bfloat16) answers as CUDA's does, with the right layout.
* ``JITFunction.run`` is replaced: a launch calls Triton's own ``run`` with ``warmup=True`` under a driver that
  answers for the target. Triton then binds the arguments, specialises them as its launcher does (pointer
  alignment and integer divisibility by 16, integers equal to 1, ``None`` as a constexpr), applies the
  heuristics and options, and compiles the variant through ptxas; nothing is launched. ``Autotuner.run`` is
  replaced by a loop that sends every configuration the autotuner would benchmark (after its own pruning)
  through the same path.
* Resource usage comes from the ptxas log that Triton prints with ``TRITON_DUMP_PTXAS_LOG=1`` (registers, spill
  stores and loads, stack frame); the caller gives a fresh ``TRITON_CACHE_DIR`` so that every variant is compiled
  in this process. Shared memory comes from the kernel's metadata; above the device's per-block limit a variant
  would fail to load (``OutOfResources``; the autotuner skips such a configuration).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

LARGE = 1 << 26
"""Operations on more elements than this in any input or output (any product with a real lm_head weight, dW, the
float32 logits of a large chunk) are replaced by a result of the right layout; those on the hidden states run."""

GIB = 2**30


@dataclass(frozen=True)
class Device:
    """What ``torch.cuda`` reports for the emulated GPU of one compute capability."""

    arch: int
    name: str
    multi_processor_count: int
    total_memory: int
    free_memory: int
    l2_cache_size: int
    shared_memory_per_block_optin: int  # bytes a block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin)


DEVICES = {
    80: Device(80, "NVIDIA A100-SXM4-80GB", 108, 80 * GIB, 78 * GIB, 40 * 2**20, 166_912),
    90: Device(90, "NVIDIA H100 80GB HBM3", 132, 81_559 * 2**20, 79 * GIB, 50 * 2**20, 232_448),
}


# -- tensors that live on the CPU and say cuda ----------------------------------------------------------------------

CUDA0 = torch.device("cuda", 0)
CPU = torch.device("cpu")


class OnGpu(torch.Tensor):
    """A CPU tensor whose Python-visible device is ``cuda:0`` (C++ code, autograd included, sees the CPU)."""

    @property
    def device(self) -> torch.device:
        return CUDA0

    @property
    def is_cuda(self) -> bool:
        return True

    def get_device(self) -> int:
        return 0


def on_gpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if isinstance(tensor, OnGpu) else tensor.as_subclass(OnGpu)


def _is_cuda(value: object) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value.startswith("cuda")
    return isinstance(value, int) and not isinstance(value, bool)  # a bare index names a CUDA device


def _to_cpu_device(value: object) -> object:
    return CPU if isinstance(value, (torch.device, str)) and _is_cuda(value) else value


class _KeepOnCpu(TorchFunctionMode):
    """Factories and ``.to()`` that name a CUDA device build on the CPU; results involving an :class:`OnGpu` tensor
    (or a redirected device) are :class:`OnGpu` too."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        redirected = False
        if "device" in kwargs and kwargs["device"] is not None and _is_cuda(kwargs["device"]):
            kwargs["device"], redirected = CPU, True
        name = getattr(func, "__name__", "")
        if name in ("cuda", "pin_memory") and args and isinstance(args[0], torch.Tensor):
            return on_gpu(args[0])
        if name == "cpu" and args and isinstance(args[0], torch.Tensor):
            return args[0].as_subclass(torch.Tensor)
        if name == "to":
            converted = tuple(_to_cpu_device(a) for a in args)
            redirected = redirected or any(a is not b for a, b in zip(converted, args, strict=True))
            args = converted
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        leaves, _ = tree_flatten((args, kwargs))
        if redirected or any(isinstance(a, OnGpu) for a in leaves):
            out = tree_map(lambda t: on_gpu(t) if type(t) is torch.Tensor else t, out)
        return out


# -- shapes without the arithmetic ----------------------------------------------------------------------------------

_NEW_TENSOR_OPS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}


def _numel(value: object) -> int:
    return value.numel() if isinstance(value, torch.Tensor) else 0


def _as_meta(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    if isinstance(value, torch.device):
        return torch.device("meta")
    return value


class _ShapesOnly(TorchDispatchMode):
    """Large operations return an uninitialised result of the right layout (or their mutated argument); small ones
    run; small new tensors are zero-filled."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        base = func.overloadpacket.__name__
        if base in _NEW_TENSOR_OPS:
            out = func(*args, **kwargs)
            if out.numel() <= LARGE:
                out.zero_()
            return out
        leaves, _ = tree_flatten((args, kwargs))
        if func.is_view or max((_numel(a) for a in leaves), default=0) <= LARGE:
            try:
                return func(*args, **kwargs)
            except NotImplementedError:
                # an operation the CPU build lacks and CUDA has (e.g. ``mm(..., out_dtype=float32)`` of bfloat16):
                # the emulated GPU has it, so its probes and paths are those of the GPU
                pass
        try:
            meta = func(*tree_map(_as_meta, args), **tree_map(_as_meta, kwargs))
        except Exception:  # no meta kernel, or a data-dependent output shape: compute it
            return func(*args, **kwargs)
        return self._realise(func, args, kwargs, meta)

    @staticmethod
    def _realise(func, args, kwargs, meta):
        schema = func._schema
        values = {a.name: (args[i] if i < len(args) else kwargs.get(a.name)) for i, a in enumerate(schema.arguments)}
        aliased = {}
        for argument in schema.arguments:
            if argument.alias_info is not None:
                for alias in argument.alias_info.before_set:
                    aliased[alias] = values[argument.name]
        returns = meta if isinstance(meta, (tuple, list)) else (meta,)
        real = []
        for spec, value in zip(schema.returns, returns, strict=True):
            if spec.alias_info is not None and spec.alias_info.before_set:
                real.append(aliased[next(iter(spec.alias_info.before_set))])
            elif isinstance(value, torch.Tensor):
                out = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=CPU)
                real.append(out.zero_() if out.numel() <= LARGE else out)
            else:
                real.append(value)
        return tuple(real) if isinstance(meta, (tuple, list)) else real[0]


# -- torch.cuda answers for the emulated device -------------------------------------------------------------------


def _device_properties(device: Device) -> SimpleNamespace:
    return SimpleNamespace(
        name=device.name, major=device.arch // 10, minor=device.arch % 10,
        multi_processor_count=device.multi_processor_count, total_memory=device.total_memory,
        L2_cache_size=device.l2_cache_size, shared_memory_per_block_optin=device.shared_memory_per_block_optin,
        shared_memory_per_block=48 * 1024, shared_memory_per_multiprocessor=device.shared_memory_per_block_optin + 1024,
        regs_per_multiprocessor=65_536, max_threads_per_multi_processor=2048, warp_size=32, is_integrated=False,
    )


@contextlib.contextmanager
def _emulated_cuda_queries(device: Device) -> Iterator[None]:
    fakes: dict[str, Callable] = {
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "get_device_properties": lambda *a, **k: _device_properties(device),
        "get_device_name": lambda *a, **k: device.name,
        "get_device_capability": lambda *a, **k: (device.arch // 10, device.arch % 10),
        "mem_get_info": lambda *a, **k: (device.free_memory, device.total_memory),
        "synchronize": lambda *a, **k: None,
        "empty_cache": lambda: None,
        "memory_allocated": lambda *a, **k: 0,
        "max_memory_allocated": lambda *a, **k: 0,
        "reset_peak_memory_stats": lambda *a, **k: None,
    }
    saved = {name: getattr(torch.cuda, name) for name in fakes}
    try:
        for name, fake in fakes.items():
            setattr(torch.cuda, name, fake)
        yield
    finally:
        for name, original in saved.items():
            setattr(torch.cuda, name, original)


# -- Triton: compile what would be launched -----------------------------------------------------------------------


class _TargetDriver:
    """The part of a Triton driver that ``JITFunction.run(warmup=True)`` consults: device, stream and target."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> str:
        return f"emulated-sm_{self.arch}"  # one kernel cache per target

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def __getattr__(self, name: str):
        raise AttributeError(f"the ahead-of-time driver has no {name!r}: this Triton version's launcher needs more of "
                             "a driver than tests/aot/launch_capture.py provides")


_REGISTERS = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass
class Variant:
    """One compiled kernel variant: what Triton specialised, and what ptxas made of it."""

    kernel: str
    arch: int
    hash: str
    signature: dict[str, str]  # non-constexpr arguments: type, with ':16' where Triton assumes divisibility by 16
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int
    shared_bytes: int
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack_frame: int | None = None
    autotuned: bool = False
    scenarios: set[str] = field(default_factory=set)

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads)

    def over_shared_limit(self) -> bool:
        return self.shared_bytes > DEVICES[self.arch].shared_memory_per_block_optin


def _describe(value: object) -> object:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return getattr(value, "__name__", None) or getattr(getattr(value, "fn", None), "__name__", None) or repr(value)


def _variant(compiled, arch: int, log: str, autotuned: bool) -> Variant:
    source = compiled.src
    fn = source.fn
    names = list(fn.arg_names)
    constexprs: dict[str, object] = {}
    for path, value in (source.constants or {}).items():
        index = path[0] if isinstance(path, tuple) else path
        key = names[index] if isinstance(index, int) else str(index)
        constexprs[key] = _describe(value)
    divisible = set()
    for path, attributes in (source.attrs or {}).items():
        index = path[0] if isinstance(path, tuple) else path
        if any(a[0] == "tt.divisibility" for a in attributes):
            divisible.add(names[index] if isinstance(index, int) else str(index))
    signature = {name: ty + (":16" if name in divisible else "") for name, ty in source.signature.items()
                 if ty != "constexpr"}
    metadata = compiled.metadata
    variant = Variant(fn.__name__, arch, compiled.hash, signature, constexprs, metadata.num_warps,
                      metadata.num_stages, metadata.shared, autotuned=autotuned)
    registers = _REGISTERS.findall(log)
    frame = _FRAME.findall(log)
    if registers:
        variant.registers = int(registers[-1])
    if frame:
        variant.stack_frame, variant.spill_stores, variant.spill_loads = map(int, frame[-1])
    return variant


class LaunchCompiler:
    """While active (a context manager), Triton launches compile for ``arch`` instead of running; the variants
    collect in :attr:`variants` (by cubin hash), each tagged with the scenarios that launched it."""

    def __init__(self, arch: int):
        self.arch = arch
        self.variants: dict[str, Variant] = {}
        self.scenario = ""
        self._autotuning = 0

    @contextlib.contextmanager
    def scenario_named(self, name: str) -> Iterator[None]:
        self.scenario = name
        try:
            yield
        finally:
            self.scenario = ""

    def __enter__(self) -> LaunchCompiler:
        from triton.runtime import autotuner, jit
        from triton.runtime.driver import driver

        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
        self._jit, self._autotuner, self._driver = jit, autotuner, driver
        self._original_run = jit.JITFunction.run
        self._original_autotune_run = autotuner.Autotuner.run
        self._saved_driver = self._driver._active
        self._driver.set_active(_TargetDriver(self.arch))
        compiler = self

        def compile_instead_of_launch(kernel, *args, grid=None, warmup=False, **kwargs):
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                compiled = compiler._original_run(kernel, *args, grid=grid, warmup=True, **kwargs)
            if hasattr(compiled, "result"):  # an asynchronous compilation
                compiled = compiled.result()
            variant = compiler.variants.get(compiled.hash)
            if variant is None:
                variant = _variant(compiled, compiler.arch, log.getvalue(), compiler._autotuning > 0)
                compiler.variants[compiled.hash] = variant
            variant.scenarios.add(compiler.scenario)
            return compiled

        def compile_every_config(tuner, *args, **kwargs):
            # what Autotuner.run benchmarks: every configuration left after its own pruning
            tuner.nargs = dict(zip(tuner.arg_names, args, strict=False))
            configs = tuner.prune_configs(kwargs) if len(tuner.configs) > 1 else tuner.configs
            compiler._autotuning += 1
            try:
                for config in configs:
                    tuner.fn.run(*args, **kwargs, **config.all_kwargs())
            finally:
                compiler._autotuning -= 1
                tuner.nargs = None

        jit.JITFunction.run = compile_instead_of_launch
        autotuner.Autotuner.run = compile_every_config
        return self

    def __exit__(self, *exc) -> None:
        self._jit.JITFunction.run = self._original_run
        self._autotuner.Autotuner.run = self._original_autotune_run
        self._driver._active = self._saved_driver
        os.environ.pop("TRITON_DUMP_PTXAS_LOG", None)


@contextlib.contextmanager
def emulated_gpu(arch: int) -> Iterator[LaunchCompiler]:
    """Everything above at once: host code believes it runs on :data:`DEVICES` ``[arch]``, large operations only
    shape their results, and Triton launches compile for ``sm_<arch>``."""
    with LaunchCompiler(arch) as compiler, _emulated_cuda_queries(DEVICES[arch]), _KeepOnCpu(), _ShapesOnly():
        yield compiler
