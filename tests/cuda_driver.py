"""The CUDA driver through ctypes: a reference that goes through neither our module nor
torch, for what the GPU tests check about contexts and mapped host memory."""

from __future__ import annotations

import ctypes

CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM = 91  # CU_DEVICE_ATTRIBUTE_...


def _driver() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def _check(result: int, call: str) -> None:
    if result != 0:
        raise RuntimeError(f"{call} returned CUresult {result}")


def current_context() -> int:
    """The context bound to the calling thread, 0 when none is."""
    ctx = ctypes.c_void_p()
    _check(_driver().cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
    return ctx.value or 0


def host_device_pointer(host_address: int) -> int:
    """The device address of page-locked host memory (needs a current context)."""
    out = ctypes.c_uint64()
    _check(
        _driver().cuMemHostGetDevicePointer_v2(ctypes.byref(out), ctypes.c_void_p(host_address), 0),
        "cuMemHostGetDevicePointer",
    )
    return out.value


def can_use_host_pointer(device: int) -> bool:
    value = ctypes.c_int()
    _check(
        _driver().cuDeviceGetAttribute(ctypes.byref(value), CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM, device),
        "cuDeviceGetAttribute",
    )
    return bool(value.value)
