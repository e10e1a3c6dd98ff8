"""Run-time CUDA compilation and launch through ctypes: NVRTC (the library PyTorch's CUDA wheels
ship) turns CUDA C++ into a cubin, the driver API (libcuda) loads and launches it on PyTorch's
current stream. No compiler toolchain, no build step, no extra Python package.

Used by the CUDA attention kernel (attention_int8_cuda). Everything is looked up on first use;
any missing piece raises CudaRuntimeError naming it, which the caller turns into a fallback.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os

import torch


class CudaRuntimeError(RuntimeError):
    """NVRTC or the CUDA driver is missing or refused a call."""


def _candidates(stem: str) -> list[str]:
    """Where a CUDA library may be: the nvidia wheels next to torch, torch's own lib folder,
    then the loader's search path."""
    import site

    roots = [os.path.dirname(os.path.dirname(torch.__file__))]
    roots += site.getsitepackages() if hasattr(site, "getsitepackages") else []
    if os.name == "nt":  # the Windows names (not tested: no Windows machine here)
        dll = {"libnvrtc": "nvrtc64_*", "libcuda": "nvcuda"}[stem]
        patterns, fallback = (f"torch/lib/{dll}.dll", f"nvidia/*/bin/{dll}.dll"), [f"{dll}.dll"]
    else:
        patterns = (f"nvidia/*/lib/{stem}.so*", f"nvidia/*/*/lib/{stem}.so*",
                    f"torch/lib/{stem}*.so*")
        fallback = [f"{stem}.so", f"{stem}.so.13", f"{stem}.so.12", f"{stem}.so.1"]
    found = []
    for root in roots:
        for pattern in patterns:
            found += sorted(glob.glob(os.path.join(root, pattern)))
    found = [f for f in found if "builtins" not in f and ".alt." not in f]
    return found + [name for name in fallback if "*" not in name]


@functools.lru_cache(maxsize=None)
def _library(stem: str) -> ctypes.CDLL:
    errors = []
    for name in _candidates(stem):
        try:
            return ctypes.CDLL(name)
        except OSError as e:
            errors.append(str(e))
    raise CudaRuntimeError(f"{stem} not found ({'; '.join(errors[-2:])})")


def nvrtc() -> ctypes.CDLL:
    return _library("libnvrtc")


def driver() -> ctypes.CDLL:
    return _library("libcuda")


def _nvrtc_check(result: int, what: str) -> None:
    if result != 0:
        lib = nvrtc()
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise CudaRuntimeError(f"NVRTC {what}: {lib.nvrtcGetErrorString(result).decode()}")


def _program_log(lib, prog) -> str:
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, buf)
    return buf.value.decode(errors="replace")


def compile_cubin(source: str, name: str, arch: str = "sm_90a",
                  options: tuple[str, ...] = ()) -> tuple[bytes, str]:
    """(cubin, compiler log) of `source` for `arch`; raises CudaRuntimeError with the log."""
    lib = nvrtc()
    prog = ctypes.c_void_p()
    _nvrtc_check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(),
                                        0, None, None), "create")
    try:
        opts = [f"--gpu-architecture={arch}", "-default-device", "--std=c++17", *options]
        array = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        result = lib.nvrtcCompileProgram(prog, len(opts), array)
        log = _program_log(lib, prog)
        if result != 0:
            raise CudaRuntimeError(f"NVRTC could not compile {name} for {arch}:\n{log[-4000:]}")
        size = ctypes.c_size_t()
        _nvrtc_check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
        cubin = ctypes.create_string_buffer(size.value)
        _nvrtc_check(lib.nvrtcGetCUBIN(prog, cubin), "cubin")
        return cubin.raw, log
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _check(result: int, what: str) -> None:
    if result != 0:
        lib = driver()
        text = ctypes.c_char_p()
        lib.cuGetErrorString(result, ctypes.byref(text))
        raise CudaRuntimeError(f"CUDA driver {what}: error {result} "
                               f"({text.value.decode() if text.value else 'unknown'})")


class Kernel:
    """One loaded kernel function on one device (its module stays loaded with it)."""

    def __init__(self, cubin: bytes, name: str, device: torch.device, shared_bytes: int):
        lib = driver()
        with torch.cuda.device(device):
            torch.cuda.init()
            torch.cuda.current_stream(device)   # makes the primary context current here
            self.module, self.function = ctypes.c_void_p(), ctypes.c_void_p()
            _check(lib.cuModuleLoadData(ctypes.byref(self.module), cubin), "module load")
            _check(lib.cuModuleGetFunction(ctypes.byref(self.function), self.module,
                                           name.encode()), f"function {name}")
            # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            _check(lib.cuFuncSetAttribute(self.function, 8, ctypes.c_int(shared_bytes)),
                   "shared memory size")
        self.device, self.shared_bytes = device, shared_bytes

    def attribute(self, attribute: int) -> int:
        value = ctypes.c_int()
        _check(driver().cuFuncGetAttribute(ctypes.byref(value), attribute, self.function),
               "attribute")
        return value.value

    def facts(self) -> dict:
        """Registers per thread, local (spill) bytes per thread and dynamic shared memory, as
        bench/attention.py records them for the Triton kernels."""
        # CU_FUNC_ATTRIBUTE_NUM_REGS = 4, LOCAL_SIZE_BYTES = 3
        return {"n_regs": self.attribute(4), "local_bytes": self.attribute(3),
                "shared": self.shared_bytes}

    def launch(self, grid: tuple[int, int, int], block: int, args: list) -> None:
        """Launch on the current stream of self.device; `args` are ctypes values in the
        kernel's parameter order."""
        params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p)
                                                 for a in args])
        with torch.cuda.device(self.device):   # the context the module was loaded into
            stream = torch.cuda.current_stream(self.device).cuda_stream
            _check(driver().cuLaunchKernel(self.function, grid[0], grid[1], grid[2], block, 1, 1,
                                           self.shared_bytes, ctypes.c_void_p(stream), params,
                                           None), "launch")


TensorMapBytes = ctypes.c_uint64 * 16


def tensor_map_2d(tensor: torch.Tensor, rows: int, cols: int, box_rows: int, box_cols: int,
                  element_bytes: int) -> TensorMapBytes:
    """A TMA descriptor of `tensor`'s memory as a row-major [rows, cols] matrix (cols
    contiguous) with [box_rows, box_cols] boxes and the 128-byte swizzle (box_cols *
    element_bytes must be 128 at most)."""
    return tensor_map(tensor, (cols, rows), (cols * element_bytes,), (box_cols, box_rows),
                      element_bytes)


def tensor_map(tensor: torch.Tensor, dims: tuple, strides: tuple, box: tuple,
               element_bytes: int) -> TensorMapBytes:
    """A TMA descriptor of `tensor`'s memory with the 128-byte swizzle: `dims` and `box` in
    elements, innermost (contiguous) first; `strides` in bytes of the outer dimensions (len(dims)
    - 1 of them, multiples of 16). Reads past a dimension's end fill zeros."""
    rank = len(dims)
    desc = TensorMapBytes()
    dtype = {1: 0, 2: 1}[element_bytes]   # CU_TENSOR_MAP_DATA_TYPE_UINT8 / UINT16: bytes moved
    # interleave none, swizzle 128B (3), L2 promotion 128B (2), no OOB fill (zeros)
    _check(driver().cuTensorMapEncodeTiled(
        desc, dtype, rank, ctypes.c_void_p(tensor.data_ptr()), (ctypes.c_uint64 * rank)(*dims),
        (ctypes.c_uint64 * (rank - 1))(*strides), (ctypes.c_uint32 * rank)(*box),
        (ctypes.c_uint32 * rank)(*([1] * rank)), 0, 3, 2, 0), "tensor map")
    return desc
