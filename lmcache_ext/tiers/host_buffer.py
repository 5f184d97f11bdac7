"""Host buffers as the tiers see them: a flat byte view of a host slot, without a copy."""

from __future__ import annotations

import torch


def byte_view(buf: object, name: str, writable: bool) -> memoryview:
    """A flat byte view of a host buffer (a CPU tensor or any contiguous buffer), no copy."""
    if isinstance(buf, torch.Tensor):
        if buf.device.type != "cpu":
            raise ValueError(f"{name} is on {buf.device}; expected a CPU tensor (a host slot)")
        if not buf.is_contiguous():
            raise ValueError(
                f"{name} with shape {tuple(buf.shape)} and strides {buf.stride()} is not contiguous; "
                "expected one dense buffer"
            )
        buf = buf.detach().reshape(-1).view(torch.uint8).numpy()
    try:
        view = memoryview(buf)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            f"{name} is a {type(buf).__name__}; expected a CPU torch.Tensor or a buffer (bytes, memoryview, ...)"
        ) from None
    if not view.c_contiguous:
        raise ValueError(f"{name} is not C-contiguous; expected one dense buffer")
    if writable and view.readonly:
        raise ValueError(f"{name} is read-only; expected a writable buffer")
    if view.nbytes == 0:
        raise ValueError(f"{name} is empty; expected at least 1 byte")
    return view.cast("B")
