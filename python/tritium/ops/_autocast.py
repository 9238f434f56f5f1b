"""torch.autocast for tritium's public functions: each casts its inputs as torch's autocast casts its twin's.

Under ``torch.autocast(device, dtype)`` torch casts the inputs of listed ops before they run: the products
(linear, attention, prelu, the CPU's LSTM and RNN) to the autocast dtype, the losses (and, on CUDA, the norms and
softmaxes) to float32 (aten/src/ATen/autocast_mode.h; the op lists of torch's amp documentation). tritium's
functions are Python over custom ops, which autocast does not see: without this, ``tritium.linear`` would run in
float32 under autocast where ``F.linear`` runs in bfloat16, and ``tritium.mse_loss`` in bfloat16 where torch's
computes in float32. ``AUTOCAST`` is the one table of which public function follows which policy on which device
type; ``wrap`` applies it (tritium.ops wraps every function the table names). Outside autocast the wrapped call
costs one check of torch's thread-local autocast state.

As torch's: only floating tensors on the autocast device, other than float64, are cast (lists and tuples of them
too: an LSTM's weights); a call given an explicit ``dtype=`` is left as it is; the function then runs with
autocast off, so nothing inside it is cast again. Functions without a torch twin follow their twin's policy where
they have an obvious one (flash_attention: scaled_dot_product_attention's; lora_linear: linear's;
sigmoid_focal_loss: torchvision's, whose result is float32 under autocast) and take their inputs' dtypes otherwise.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Dict

import torch
from torch import Tensor

LOWER = "lower"     # cast to the autocast dtype (torch's lower_precision_fp)
FP32 = "fp32"       # cast to float32
BANNED = "banned"   # torch refuses the op under autocast on that device (binary_cross_entropy on CUDA)

_BOTH_LOWER = {"cpu": LOWER, "cuda": LOWER}
_BOTH_FP32 = {"cpu": FP32, "cuda": FP32}

# public function -> {device type: policy}; a device type not named: the call runs as given
AUTOCAST: Dict[str, Dict[str, str]] = {
    "linear": _BOTH_LOWER, "prelu": _BOTH_LOWER, "scaled_dot_product_attention": _BOTH_LOWER,
    "flash_attention": _BOTH_LOWER, "lora_linear": _BOTH_LOWER,
    # torch's CPU autocast runs LSTM and the plain RNN (mkldnn's rnn layer) in the autocast dtype, GRU in float32
    "lstm": {"cpu": LOWER}, "rnn_tanh": {"cpu": LOWER}, "rnn_relu": {"cpu": LOWER},
    **{name: _BOTH_FP32 for name in (
        "cross_entropy", "kl_div", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss",
        "binary_cross_entropy_with_logits", "soft_margin_loss", "hinge_embedding_loss", "margin_ranking_loss",
        "triplet_margin_loss", "cosine_embedding_loss", "multi_margin_loss", "sigmoid_focal_loss")},
    "binary_cross_entropy": {"cpu": FP32, "cuda": BANNED},
    # CUDA's autocast also computes the norms and softmaxes in float32 (the CPU's leaves them as given)
    **{name: {"cuda": FP32} for name in ("layer_norm", "group_norm", "softmax", "log_softmax", "softmin",
                                         "softplus")},
}

_BANNED_MESSAGE = (
    "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast.\n"
    "Many models use a sigmoid layer right before the binary cross entropy layer.\n"
    "In this case, combine the two layers using torch.nn.functional.binary_cross_entropy_with_logits\n"
    "or torch.nn.BCEWithLogitsLoss.  binary_cross_entropy_with_logits and BCEWithLogits are\n"
    "safe to autocast.")


def _device_type(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            return a.device.type
        if isinstance(a, (list, tuple)):
            for t in a:
                if isinstance(t, Tensor):
                    return t.device.type
    return None


def _cast(x, dtype: torch.dtype, device_type: str):
    if isinstance(x, Tensor):
        if x.is_floating_point() and x.dtype != torch.float64 and x.dtype != dtype and x.device.type == device_type:
            return x.to(dtype)
        return x
    if isinstance(x, (list, tuple)) and any(isinstance(t, Tensor) for t in x):
        return type(x)(_cast(t, dtype, device_type) for t in x)
    return x


def _autocast_call(fn: Callable, name: str, args, kwargs):
    device_type = _device_type(args, kwargs)
    policy = AUTOCAST[name].get(device_type)
    if policy is None or not torch.is_autocast_enabled(device_type) or kwargs.get("dtype") is not None:
        return fn(*args, **kwargs)
    if policy == BANNED:
        raise RuntimeError(_BANNED_MESSAGE)
    dtype = torch.get_autocast_dtype(device_type) if policy == LOWER else torch.float32
    args = tuple(_cast(a, dtype, device_type) for a in args)
    kwargs = {k: _cast(v, dtype, device_type) for k, v in kwargs.items()}
    with torch.autocast(device_type, enabled=False):
        return fn(*args, **kwargs)


def wrap(name: str, fn: Callable) -> Callable:
    """fn (the public function `name` of AUTOCAST) casting its inputs under torch.autocast as the table says. A
    function taking torch's ``_stacklevel`` (softmax's: its warnings name the caller's line) gets it one deeper,
    for this wrapper's frame."""
    params = list(inspect.signature(fn).parameters.values())
    at = next((i for i, p in enumerate(params) if p.name == "_stacklevel"), None)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if at is not None:
            if len(args) > at:
                args = (*args[:at], args[at] + 1, *args[at + 1:])
            else:
                kwargs["_stacklevel"] = kwargs.get("_stacklevel", params[at].default) + 1
        if not torch._C._is_any_autocast_enabled():
            return fn(*args, **kwargs)
        return _autocast_call(fn, name, args, kwargs)

    return call
