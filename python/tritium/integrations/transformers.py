"""Hugging Face transformers models on tritium's kernels: RMSNorm, RoPE, the gated MLP, attention and the LM loss.

Two ways in, both returning what they replaced and both undone by :func:`revert`:

- ``apply(model, ...)`` patches a built model in place: each module of a patched class gets a tritium twin class
  (a subclass with the same name, parameters and state_dict that overrides ``forward``), and with
  ``attention=True`` the model's attention implementation becomes ``"tritium"``. Other models are untouched.
- ``apply_to(model_type, ...)`` (or ``apply_to_llama(...)`` etc.) patches the family's classes in place, for every
  model of that family built before or after, as Liger-Kernel's ``apply_liger_kernel_to_llama()`` does; with
  ``attention=True`` a model loaded without an ``attn_implementation`` gets ``"tritium"``.

What each switch replaces (``FAMILIES`` lists the classes per model type):

- ``rms_norm``: the family's RMSNorm (Gemma's ``(1 + weight)`` form included; Qwen3's and Gemma3's q/k norms are
  the same class) by ``tritium.rms_norm``.
- ``rope``: the rotary embedding inside the attention module's forward by ``tritium.rope`` (q and k in one
  kernel, the model's own cos/sin values).
- ``swiglu``: the gated MLP's ``act(gate) * up`` by ``tritium.swiglu`` (silu) or ``tritium.geglu`` (gelu,
  gelu_pytorch_tanh), separate or fused (Phi-3's ``gate_up_proj``) projections; other activations keep torch's.
- ``attention``: transformers' attention interface ``"tritium"`` (registered on import, so
  ``from_pretrained(..., attn_implementation="tritium")`` works without any patch): ``tritium.flash_attention``
  for causal prefill and cached decode, the masked kernel for padded batches; GQA, sliding windows and logit
  soft-capping in the kernel.
- ``fused_linear_cross_entropy``: in training mode with ``labels``, the LM head and the loss run as tritium's fused
  linear cross-entropy, so the (tokens, vocab) logits are never materialised (``logits`` is None); transformers'
  label shift (or its ``shift_labels``), ``ignore_index`` and ``num_items_in_batch``. Eval mode, a wrapped LM head
  (a PEFT adapter on ``lm_head``) or final-logit soft-capping (Gemma 2/3) take the model's own path.
- ``cross_entropy``: where logits are materialised, the loss on them by ``tritium.cross_entropy``.
- ``linear`` (``apply`` only: the ``torch.nn.Linear`` children of the attention, MLP and LM modules get a twin,
  the class itself stays torch's): without autograd on CPU at a decode step's few rows, the projections and the
  LM head by tritium's ``linear_small`` (the weight streamed as stored; BLAS repacks it on every call);
  otherwise ``F.linear``.

The MoE families (mixtral, qwen3_moe) get norms, rope, attention, the dense MLPs and the fused loss; their
experts and router stay transformers'.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import sys
import types
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast
from transformers.utils import can_return_tuple

from .. import ops
from .._backend import use_reference
from ..ops._library import call_op, kernel_ok
from ..ops.attention import _sdpa_mask, _tensors_ok, flash_attn_fwd
from ..ops.cross_entropy import default_chunk_size, flce_fwd, lm_head_grads
from ..ops.linear import linear_small, small_rows_ok

ATTN_IMPLEMENTATION = "tritium"


@dataclass(frozen=True)
class Family:
    """The classes of one transformers model type that tritium patches, in ``transformers.models.<module>``."""
    module: str                 # e.g. "llama": transformers.models.llama.modeling_llama
    lm: Tuple[str, ...]         # causal LM classes (the fused loss)
    norms: Tuple[str, ...]      # RMSNorm classes
    mlps: Tuple[str, ...]       # gated MLP classes (gate_proj/up_proj/down_proj, or Phi-3's gate_up_proj/down_proj)
    attentions: Tuple[str, ...]  # attention classes (rope)
    gemma_norm: bool = False    # the norm scales by (1 + weight), in float32


def _dense(prefix: str, module: str, **kw) -> Family:
    return Family(module, (f"{prefix}ForCausalLM",), (f"{prefix}RMSNorm",), (f"{prefix}MLP",), (f"{prefix}Attention",),
                  **kw)


FAMILIES: Dict[str, Family] = {
    "llama": _dense("Llama", "llama"),
    "mistral": _dense("Mistral", "mistral"),
    "qwen2": _dense("Qwen2", "qwen2"),
    "qwen3": _dense("Qwen3", "qwen3"),
    "gemma2": _dense("Gemma2", "gemma2", gemma_norm=True),
    "gemma3_text": _dense("Gemma3", "gemma3", gemma_norm=True),
    "phi3": _dense("Phi3", "phi3"),
    "mixtral": Family("mixtral", ("MixtralForCausalLM",), ("MixtralRMSNorm",), (), ("MixtralAttention",)),
    "qwen3_moe": _dense("Qwen3Moe", "qwen3_moe"),
}


def _module(family: Family) -> types.ModuleType:
    return importlib.import_module(f"transformers.models.{family.module}.modeling_{family.module}")


def _family(model_type, caller: str) -> Family:
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"tritium.integrations.transformers.{caller}: model type {model_type!r} is not supported; "
                         f"supported: {', '.join(sorted(FAMILIES))}")
    return family


# ---- the replacement forwards ----
def _rms_norm_forward(self, hidden_states: Tensor) -> Tensor:
    return ops.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self.variance_epsilon)


def _gemma_rms_norm_forward(self, x: Tensor) -> Tensor:
    # Gemma normalises and scales in float32, weight stored as (scale - 1), and rounds once at the end
    return ops.rms_norm(x.float(), (x.shape[-1],), 1.0 + self.weight.float(), self.eps).type_as(x)


def _linear_forward(self, input: Tensor) -> Tensor:
    """nn.Linear's forward; without autograd on CPU at the few rows of a decode step (small_rows_ok: any row count
    in float32, one row in 16-bit), tritium's linear_small, which streams the weight as stored where BLAS repacks
    it on every call (a bias is added after, in float32 and float64 only, where that is one rounding as in torch)."""
    w, b = self.weight, self.bias
    if (input.device.type == "cpu" and input.dim() >= 2 and input.shape[-1] == w.shape[-1]
            and not (torch.is_grad_enabled() and (input.requires_grad or w.requires_grad
                                                  or (b is not None and b.requires_grad)))
            and (b is None or (b.dtype == input.dtype and input.dtype in (torch.float32, torch.float64)))
            and not use_reference()):
        x2 = input.reshape(-1, w.shape[-1])
        if small_rows_ok(x2, w):
            y = linear_small(x2, w)
            if b is not None:
                y.add_(b)
            return y.view(input.shape[:-1] + (w.shape[0],))
    return F.linear(input, w, b)


# transformers' activation name -> (tritium's gated op, its keyword arguments)
_GATED = {"silu": ("swiglu", {}), "swish": ("swiglu", {}), "gelu": ("geglu", {}),
          "gelu_pytorch_tanh": ("geglu", {"approximate": "tanh"})}


def _mlp_forward(original: Callable) -> Callable:
    @functools.wraps(original)
    def forward(self, x: Tensor) -> Tensor:
        config = self.config
        gated = _GATED.get(getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None))
        if gated is None:
            return original(self, x)
        op, kw = getattr(ops, gated[0]), gated[1]
        if hasattr(self, "gate_up_proj"):  # Phi-3: one [gate | up] projection
            return self.down_proj(op(self.gate_up_proj(x), **kw))
        return self.down_proj(op(self.gate_proj(x), self.up_proj(x), **kw))
    return forward


def _rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> Tuple[Tensor, Tensor]:
    """transformers' apply_rotary_pos_emb on tritium.rope: q (batch, heads, seq, head_dim), k likewise, cos/sin
    (batch or 1, seq, rotary_dim) holding the angles' cos/sin twice (Llama's halves). Each (batch, seq) row of cos
    becomes a row of tritium's table, so any position ids (padding, packing, a cache offset) carry over."""
    if unsqueeze_dim != 1 or cos.dim() != 3:
        raise ValueError(f"tritium rope: expected (batch, seq, rotary_dim) cos/sin and unsqueeze_dim=1, got "
                         f"{tuple(cos.shape)} and unsqueeze_dim={unsqueeze_dim}")
    qo, ko = ops.rope(q.transpose(1, 2), k.transpose(1, 2), *_rope_tables(cos, sin, q.shape[0]))
    return qo.transpose(1, 2), ko.transpose(1, 2)


_LAST_TABLES: list = [None]  # [(weakref to cos, weakref to sin, batch, tables)]


def _rope_tables(cos: Tensor, sin: Tensor, batch: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(cos table, sin table, positions) for tritium.rope. Every layer of one forward gets the same cos/sin
    tensors, so the last conversion is kept (by identity, outside torch.compile): one per forward, not per layer,
    which matters in a decode step where the conversion costs as much as the kernel."""
    last = _LAST_TABLES[0]
    compiling = torch.compiler.is_compiling()
    if not compiling and last is not None and last[0]() is cos and last[1]() is sin and last[2] == batch:
        return last[3]
    b, s, r = cos.shape
    half = r // 2
    tables = (cos[..., :half].reshape(b * s, half).float(), sin[..., :half].reshape(b * s, half).float(),
              torch.arange(b * s, device=cos.device).view(b, s).expand(batch, s))
    if not compiling:
        _LAST_TABLES[0] = (weakref.ref(cos), weakref.ref(sin), batch, tables)
    return tables


def _with_globals(fn: Callable, module_dict: dict, overrides: dict) -> Callable:
    """fn rebuilt so that the names in overrides resolve to their new values wherever fn (or a function it wraps:
    a decorator's closure) reads module_dict's globals. The module itself is untouched: only the twin's method
    sees the overrides."""
    closure = fn.__closure__
    if closure:
        closure = tuple(types.CellType(_with_globals(c.cell_contents, module_dict, overrides))
                        if isinstance(c.cell_contents, types.FunctionType) else c for c in closure)
    g = {**module_dict, **overrides} if fn.__globals__ is module_dict else fn.__globals__
    new = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, closure)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    new.__qualname__, new.__module__, new.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
    if "__wrapped__" in fn.__dict__:
        new.__wrapped__ = _with_globals(fn.__wrapped__, module_dict, overrides)
    return new


def _attention_forward(original: Callable, module: types.ModuleType) -> Callable:
    return _with_globals(original, vars(module), {"apply_rotary_pos_emb": _rope})


def tritium_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs) -> Tuple[Tensor, None]:
    """transformers' attention interface on tritium's flash kernels: query (batch, heads, L, D), key/value
    (batch, kv_heads, S, D), attention_mask None (plain causal, or a decode step) or sdpa_mask's boolean
    (batch, 1, L, S) (True: attend). Returns ((batch, L, heads, D), None). Dropout, attention weights and position
    biases go to the model's own eager attention."""
    if (dropout and module.training) or kwargs.get("output_attentions") or kwargs.get("position_bias") is not None:
        eager = vars(sys.modules[type(module).__module__])["eager_attention_forward"]
        return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                     sliding_window=sliding_window, softcap=softcap, **kwargs)
    L, S = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None:
        # sdpa_mask leaves the mask out only when is_causal alone says it: a decode step sees every key, a prefill
        # from an empty static cache sees the first L keys (top-left), anything else has L == S
        if L > 1 and S > L:
            key, value = key[:, :, :L], value[:, :, :L]
        window = None if not sliding_window else (sliding_window - 1, -1)
        out = ops.flash_attention(query, key, value, causal=causal and L > 1, scale=scaling, window=window,
                                  softcap=softcap)
        return out.transpose(1, 2), None
    ok, mask = _sdpa_mask(attention_mask, query, S)
    if not (ok and _tensors_ok(query, key, value)):
        eager = vars(sys.modules[type(module).__module__])["eager_attention_forward"]
        return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                     sliding_window=sliding_window, softcap=softcap, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    out, _ = call_op(flash_attn_fwd, query, key, value, mask, scale, 0, -1, -1, float(softcap or 0.0))
    return out.transpose(1, 2), None


AttentionInterface.register(ATTN_IMPLEMENTATION, tritium_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


# ---- the loss ----
def causal_lm_loss(hidden: Tensor, lm_head: torch.nn.Linear, labels: Optional[Tensor] = None,
                   shift_labels: Optional[Tensor] = None, num_items_in_batch=None, ignore_index: int = -100) -> Tensor:
    """transformers' ForCausalLMLoss of lm_head(hidden) without the logits: tokens < n predict n (labels shifted
    left, the last position ignored) unless shift_labels are given; the mean over non-ignored tokens, or their sum
    divided by num_items_in_batch (gradient accumulation). float32, as transformers' (the public
    tritium.fused_linear_cross_entropy returns hidden's dtype, so this calls its registered op)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    H = hidden.shape[-1]
    h2 = hidden.reshape(-1, H)
    target = shift_labels.reshape(-1).to(device=hidden.device, dtype=torch.int64)
    weight, bias = lm_head.weight, lm_head.bias
    mean = num_items_in_batch is None
    if kernel_ok(h2, weight, *([bias] if bias is not None else [])):
        need_grad, weight_grad = lm_head_grads(h2, weight, bias)   # weight_grad False: a frozen head
        chunk = default_chunk_size(h2.shape[0], H, weight.shape[0], h2.dtype, h2.device)
        loss = call_op(flce_fwd, h2, weight, target, bias, ignore_index, 0.0, chunk, mean, need_grad, 0.0, 0.0,
                       weight_grad)[0].float()
    else:
        logits = F.linear(h2, weight, bias).float()
        loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="mean" if mean else "sum")
    if not mean:
        loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch)
                       else num_items_in_batch)
    return loss


def _logits_loss(logits: Tensor, labels: Tensor, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
                 shift_labels: Optional[Tensor] = None, **kwargs) -> Tensor:
    """transformers' ForCausalLMLoss (float32 logits, label shift, num_items_in_batch) on tritium.cross_entropy."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.reshape(-1).to(logits.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = ops.cross_entropy(logits.float().view(-1, vocab_size), target, ignore_index=ignore_index,
                             reduction=reduction)
    if num_items_in_batch is not None:
        loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch)
                       else num_items_in_batch)
    return loss


def _plain_linear(m: torch.nn.Module) -> bool:
    """m is a torch.nn.Linear or its tritium twin (not a subclass with other weights, not a PEFT wrapper)."""
    return type(m) is torch.nn.Linear or type(m).__dict__.get("_tritium_base") is torch.nn.Linear


def _lm_forward(original: Callable, module: types.ModuleType) -> Callable:
    names = [p for p in inspect.signature(original).parameters if p != "self"]

    @can_return_tuple
    def fused(self, labels=None, shift_labels=None, num_items_in_batch=None, ignore_index=-100, logits_to_keep=0,
              output_router_logits=None, **kwargs):
        moe = hasattr(self, "router_aux_loss_coef")
        if moe:
            output_router_logits = (output_router_logits if output_router_logits is not None
                                    else self.config.output_router_logits)
            kwargs["output_router_logits"] = output_router_logits
        outputs = self.model(**kwargs)
        loss = causal_lm_loss(outputs.last_hidden_state, self.lm_head, labels, shift_labels, num_items_in_batch,
                              ignore_index)
        common = dict(loss=loss, logits=None, cache=outputs.cache, hidden_states=outputs.hidden_states,
                      attentions=outputs.attentions)
        if not moe:
            return CausalLMOutputWithPast(**common)
        aux_loss = None
        if output_router_logits:
            aux_loss = module.load_balancing_loss_func(outputs.router_logits, self.num_experts,
                                                       self.num_experts_per_tok, kwargs.get("attention_mask"))
            common["loss"] = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
        return MoeCausalLMOutputWithPast(aux_loss=aux_loss, router_logits=outputs.router_logits, **common)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        if args:
            kwargs.update(zip(names, args))
        if (self.training and kwargs.get("labels") is not None
                and _plain_linear(self.lm_head)
                and getattr(self.config, "final_logit_softcapping", None) is None):
            return fused(self, **kwargs)
        return original(self, **kwargs)
    return forward


# ---- what each switch sets on which class ----
@functools.cache
def _original(cls: type, attr: str):
    """cls's own attr before tritium touched it (recorded on first use; every patch goes through here first)."""
    return cls.__dict__.get(attr, getattr(cls, attr, None))


@functools.cache
def _replacement(family: Family, cls: type, attr: str):
    """The one replacement object for (cls, attr), shared by the class patch and the instances' twins."""
    module = _module(family)
    original = _original(cls, attr)
    if attr == "_loss_function":
        return staticmethod(_logits_loss)
    if cls is torch.nn.Linear:
        return _linear_forward
    if cls.__name__ in family.norms:
        return _gemma_rms_norm_forward if family.gemma_norm else _rms_norm_forward
    if cls.__name__ in family.mlps:
        return _mlp_forward(original)
    if cls.__name__ in family.attentions:
        return _attention_forward(original, module)
    return _lm_forward(original, module)


def _targets(family: Family, flags: dict) -> List[Tuple[type, Tuple[str, ...]]]:
    """[(class, attributes to replace)] for the switches that are on."""
    module = _module(family)
    out = []
    for switch, names in (("rms_norm", family.norms), ("swiglu", family.mlps), ("rope", family.attentions)):
        if flags[switch]:
            out += [(getattr(module, n), ("forward",)) for n in names]
    lm_attrs = (("forward",) if flags["fused_linear_cross_entropy"] else ()) + \
        (("_loss_function",) if flags["cross_entropy"] else ())
    if lm_attrs:
        out += [(getattr(module, n), lm_attrs) for n in family.lm]
    return out


@functools.cache
def _twin(family: Family, cls: type, attrs: Tuple[str, ...]) -> type:
    """cls's tritium twin: a subclass of the same name overriding attrs (isinstance, state_dict and the name a
    saved config records stay cls's)."""
    body = {a: _replacement(family, cls, a) for a in attrs}
    body.update(__module__=cls.__module__, __qualname__=cls.__qualname__, _tritium_base=cls)
    return type(cls.__name__, (cls,), body)


# ---- instance patching ----
def apply(model: torch.nn.Module, rms_norm: bool = True, rope: bool = True, swiglu: bool = True,
          attention: bool = True, cross_entropy: bool = False, fused_linear_cross_entropy: bool = True,
          linear: bool = True) -> List[tuple]:
    """Patch a built transformers model (or a PEFT model wrapping one) in place. Returns [(qualified module name,
    original class)] for each module swapped to its tritium twin, plus ("config._attn_implementation", the previous
    implementation) when attention switched; [] when there was nothing left to patch (applying twice is a no-op).
    ValueError for a model type not in FAMILIES."""
    flags = dict(rms_norm=rms_norm, rope=rope, swiglu=swiglu, attention=attention, cross_entropy=cross_entropy,
                 fused_linear_cross_entropy=fused_linear_cross_entropy)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    family = _family(getattr(config, "model_type", type(model).__name__), "apply")
    wanted = dict(_targets(family, flags))
    # linear: the torch.nn.Linear children of the attention, MLP and LM modules (an adapter's own layers, e.g.
    # PEFT's lora_A / lora_B, stay as they are); instances only, as apply_to cannot patch torch.nn.Linear itself
    module = _module(family)
    parents = tuple(getattr(module, n) for n in family.attentions + family.mlps + family.lm) if linear else ()
    replaced = []
    for name, m in model.named_modules():
        attrs = wanted.get(type(m))
        if attrs is not None:
            replaced.append((name, type(m)))
            m.__class__ = _twin(family, type(m), attrs)
        if parents and isinstance(m, parents):
            for child_name, child in m.named_children():
                if type(child) is torch.nn.Linear:
                    replaced.append((f"{name}.{child_name}" if name else child_name, torch.nn.Linear))
                    child.__class__ = _twin(family, torch.nn.Linear, ("forward",))
    if flags["attention"] and config._attn_implementation != ATTN_IMPLEMENTATION:
        replaced.append(("config._attn_implementation", config._attn_implementation))
        base._tritium_attn_before = config._attn_implementation
        base.set_attn_implementation(ATTN_IMPLEMENTATION)
    return replaced


# ---- class patching ----
_CLASS_PATCHES: Dict[str, List[Tuple[type, str, object]]] = {}  # model type -> [(class, attr, its own value)]
_MISSING = object()


def _default_to_tritium(original: Callable) -> Callable:
    @functools.wraps(original)
    def check(self, attn_implementation, *args, **kwargs):
        return original(self, ATTN_IMPLEMENTATION if attn_implementation is None else attn_implementation,
                        *args, **kwargs)
    return check


def apply_to(model_type: str, rms_norm: bool = True, rope: bool = True, swiglu: bool = True, attention: bool = True,
             cross_entropy: bool = False, fused_linear_cross_entropy: bool = True) -> List[tuple]:
    """Patch the classes of a model type in place (before from_pretrained, or for models already built). Returns
    [(class.attr, the original)] for each attribute replaced; [] when everything asked for was patched already.
    ValueError for a model type not in FAMILIES."""
    flags = dict(rms_norm=rms_norm, rope=rope, swiglu=swiglu, attention=attention, cross_entropy=cross_entropy,
                 fused_linear_cross_entropy=fused_linear_cross_entropy)
    family = _family(model_type, "apply_to")
    patches = _CLASS_PATCHES.setdefault(model_type, [])
    done = {(c, a) for c, a, _ in patches}
    todo = [(cls, a, _replacement(family, cls, a)) for cls, attrs in _targets(family, flags) for a in attrs]
    if flags["attention"]:
        pretrained = getattr(_module(family), f"{family.lm[0].removesuffix('ForCausalLM')}PreTrainedModel")
        check = "_check_and_adjust_attn_implementation"
        todo.append((pretrained, check, _default_to_tritium(getattr(pretrained, check))))
    replaced = []
    for cls, attr, new in todo:
        if (cls, attr) in done:
            continue
        _original(cls, attr)
        patches.append((cls, attr, cls.__dict__.get(attr, _MISSING)))
        replaced.append((f"{cls.__name__}.{attr}", getattr(cls, attr)))
        setattr(cls, attr, new)
    return replaced


def revert(target) -> List[tuple]:
    """Undo apply (target: the model) or apply_to (target: the model type). Returns what was restored, in the
    form apply / apply_to returned it."""
    if isinstance(target, str):
        _family(target, "revert")
        restored = []
        for cls, attr, own in reversed(_CLASS_PATCHES.pop(target, [])):
            if own is _MISSING:
                delattr(cls, attr)
            else:
                setattr(cls, attr, own)
            restored.append((f"{cls.__name__}.{attr}", getattr(cls, attr)))
        return restored[::-1]
    restored = []
    for name, m in target.named_modules():
        base_cls = type(m).__dict__.get("_tritium_base")
        if base_cls is not None:
            m.__class__ = base_cls
            restored.append((name, base_cls))
    base = target.get_base_model() if hasattr(target, "get_base_model") else target
    before = base.__dict__.pop("_tritium_attn_before", None)
    if before is not None:
        base.set_attn_implementation(before)
        restored.append(("config._attn_implementation", before))
    return restored


def _per_family(model_type: str) -> Callable:
    def apply_to_family(**switches) -> List[tuple]:
        return apply_to(model_type, **switches)
    apply_to_family.__name__ = apply_to_family.__qualname__ = f"apply_to_{model_type}"
    apply_to_family.__doc__ = f"apply_to({model_type!r}, **switches): patch the {model_type} classes in place."
    return apply_to_family


for _t in FAMILIES:
    globals()[f"apply_to_{_t}"] = _per_family(_t)

__all__ = ["apply", "apply_to", "revert", "causal_lm_loss", "tritium_attention", "FAMILIES", "ATTN_IMPLEMENTATION",
           *(f"apply_to_{t}" for t in FAMILIES)]
