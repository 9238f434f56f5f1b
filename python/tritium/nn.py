"""Drop-in modules: subclasses of the torch.nn modules that override only ``forward``, so state_dicts,
``extra_repr`` and isinstance checks are the torch module's; and ``patch(model)`` to swap them in place."""
from __future__ import annotations

from typing import Dict, List, Tuple, Type

import torch
from torch import Tensor

from . import ops


class RMSNorm(torch.nn.RMSNorm):
    def forward(self, x: Tensor) -> Tensor:
        return ops.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class LayerNorm(torch.nn.LayerNorm):
    def forward(self, x: Tensor) -> Tensor:
        return ops.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


# torch module class -> its tritium twin; every later op family adds its rows here.
PATCH_TABLE: Dict[Type[torch.nn.Module], Type[torch.nn.Module]] = {
    torch.nn.RMSNorm: RMSNorm,
    torch.nn.LayerNorm: LayerNorm,
}


def patch(model: torch.nn.Module) -> List[Tuple[str, Type[torch.nn.Module]]]:
    """Swap every torch module in ``model`` that has a tritium twin for that twin, in place (the module
    object, its parameters, buffers and hooks stay; only its class changes). Exact class matches only, so
    user subclasses with their own forward are left alone. Returns [(qualified name, original class)]."""
    replaced = []
    for name, module in model.named_modules():
        twin = PATCH_TABLE.get(type(module))
        if twin is not None:
            replaced.append((name, type(module)))
            module.__class__ = twin
    return replaced
