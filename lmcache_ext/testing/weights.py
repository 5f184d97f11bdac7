"""An in-place weight update, as an RL trainer makes between rollouts. A function of an
importable module, so vLLM can send it to workers in other processes
(`collective_rpc("apply_model", args=(scale_first_layer,))`)."""

from __future__ import annotations

from typing import Any


def scale_first_layer(model: Any) -> bool:
    """Scale every weight of the model's first decoder layer by 1.5: every later layer's KV changes."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".layers.0." in name:
                param.mul_(1.5)
    return True
