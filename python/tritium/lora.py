"""LoRA fine-tuning of any model's linear layers (docs/lora.md): ``apply`` replaces the matching torch.nn.Linear
modules in place with tritium.nn.LoRALinear (the fused lora_linear op) and freezes everything else; ``merge`` /
``unmerge`` fold the adapters into the weights and back; ``save`` / ``load`` write and read adapters in PEFT's
format (adapter_config.json + adapter_model.safetensors, PEFT's key names ``base_model.model.<module>.lora_A.weight``),
so an adapter trained here loads in PEFT (``PeftModel.from_pretrained``) and one PEFT saved loads here.

    model = tritium.lora.apply(model, r=16, alpha=32, dropout=0.05, targets=["q_proj", "v_proj"])
    ... train (only the adapters require grad) ...
    tritium.lora.save(model, "adapter/")
    tritium.lora.load(fresh_model, "adapter/")

``targets`` follows PEFT's ``target_modules``: a list of names, each matching a module whose qualified name is that
name or ends with "." + it; a string, a regular expression the whole qualified name must match; None, every linear
layer.

A model with fused projections (tritium.models.llama.Llama: one [q | k | v] and one [gate | up] weight per layer)
names its projections' row blocks by their Hugging Face layers (``model.hf_projections()``,
``model.layers.0.self_attn.q_proj``): targets match those names, each chosen block gets its own adapter (one
lora_linear call per projection, tritium.models.llama.LoRAParts), and save / load use those names, so the adapter
is PEFT's for the Hugging Face model (and its eager twin) with the same weights.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from types import SimpleNamespace
from typing import Dict, Iterable, Optional, Union

import torch

from .nn import LoRALinear, _check_lora_args

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."   # PEFT's key prefix: PeftModel.base_model (LoraModel) .model (the user's model)

Targets = Union[None, str, Iterable[str]]


def _matches(name: str, targets: Targets) -> bool:
    """PEFT's target_modules rule for one module's qualified name."""
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _pattern(patterns: Dict[str, float], name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the value of the first key that matches the end of the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def lora_modules(model: torch.nn.Module) -> Dict[str, LoRALinear]:
    """The model's LoRALinear layers by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _fused(model: torch.nn.Module) -> bool:
    """Whether the model names its fused projections' row blocks (hf_projections; see the module docstring)."""
    return callable(getattr(model, "hf_projections", None))


def _adapters(model: torch.nn.Module) -> Dict[str, object]:
    """Every adapter of the model by its PEFT module name, each with lora_A, lora_B, r, lora_alpha, lora_dropout,
    use_rslora: the LoRALinear layers by qualified name and the adapted row blocks of fused projections by their
    Hugging Face layer names."""
    out: Dict[str, object] = dict(lora_modules(model))
    if _fused(model):
        for lin, names, _ in model.hf_projections():
            parts = lin.lora
            if parts is None:
                continue
            for i, j in enumerate(parts.blocks()):
                out[names[j]] = SimpleNamespace(lora_A=parts.lora_A[i], lora_B=parts.lora_B[i], r=parts.r,
                                                lora_alpha=parts.lora_alpha, lora_dropout=parts.lora_dropout,
                                                use_rslora=parts.use_rslora)
    return out


def _freeze(model: torch.nn.Module) -> None:
    """Only the adapters train: every parameter frozen but the adapters' lora_A and lora_B."""
    for p in model.parameters():
        p.requires_grad_(False)
    for m in _adapters(model).values():
        m.lora_A.requires_grad_(True)
        m.lora_B.requires_grad_(True)


def _replace(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def apply(model: torch.nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.05, targets: Targets = None,
          use_rslora: bool = False, quantize: Optional[str] = None, blocksize: int = 64,
          double_quant: bool = False, group_size: Optional[int] = None) -> torch.nn.Module:
    """Replace, in place, each torch.nn.Linear of ``model`` whose qualified name matches ``targets`` (PEFT's
    target_modules rule, module docstring) with a LoRALinear of rank ``r``, scaling ``alpha / r`` (``alpha /
    sqrt(r)`` with use_rslora) and ``dropout`` on the adapter's input, sharing the layer's weight and bias; freeze
    every other parameter. Layers already adapted are left as they are. Returns the model.

    ``quantize="nf4"`` (QLoRA): each adapted layer's base weight is quantized to NF4 in bitsandbytes' layout
    (``blocksize`` elements per absmax, ``double_quant`` for bitsandbytes' compress_statistics; tritium.quantize_nf4,
    LoRALinear.quantize_base) and multiplied dequantised in the kernel; the layer's in_features must be a multiple
    of the blocksize. ``quantize="int8"`` (per output channel, or per group of ``group_size``) or ``"int4"`` (per
    group of ``group_size``, default 32): the base weight a tritium.ops.quant.QuantizedWeight (docs/quantization.md)
    multiplied by the quantized linear op; group_size must divide every chosen layer's in_features. A layer that
    does not fit raises ValueError naming it and its in_features before any layer is changed."""
    _check_lora_args("apply", r, dropout)
    if quantize not in (None, "nf4", "int8", "int4"):
        raise ValueError(f"apply: quantize must be None, 'nf4', 'int8' or 'int4', got {quantize!r}")
    if not (targets is None or isinstance(targets, str)):
        targets = list(targets)
        if not all(isinstance(t, str) for t in targets):
            raise TypeError(f"apply: targets must be None, a regular expression or a list of module names, got "
                            f"{targets!r}")
    unit = _base_unit(quantize, blocksize, group_size)
    if _fused(model):
        return _apply_fused(model, r, alpha, dropout, targets, use_rslora, quantize, blocksize, double_quant,
                            group_size)
    linear = [name for name, m in model.named_modules()
              if name and isinstance(m, torch.nn.Linear) and not isinstance(m, LoRALinear)]
    chosen = [name for name in linear if _matches(name, targets)]
    if not chosen:
        shown = ", ".join(linear[:8]) + (", ..." if len(linear) > 8 else "")
        raise ValueError(f"apply: targets {targets!r} match no torch.nn.Linear module of the model (its linear "
                         f"layers not yet adapted: {shown or 'none'})")
    _check_units(quantize, unit, [(n, model.get_submodule(n).in_features) for n in chosen], "layers")
    for name in chosen:
        layer = LoRALinear.from_linear(model.get_submodule(name), r, alpha, dropout, use_rslora)
        if quantize is not None:
            layer.quantize_base(quantize, blocksize, double_quant, group_size)
        _replace(model, name, layer)
    _freeze(model)
    return model


def _base_unit(quantize: Optional[str], blocksize: int, group_size: Optional[int]):
    """apply's checks of the quantized base's arguments. Returns what every chosen layer's in_features must be a
    multiple of, as (argument name, value), or None (a float base, or int8 per channel: any in_features)."""
    if quantize == "nf4":
        from .ops.nf4 import BLOCKSIZES

        if isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
            raise ValueError(f"apply: blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
        return "blocksize", blocksize
    if quantize in ("int8", "int4"):
        from .ops.quant import BLOCK

        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                       or group_size <= 0 or group_size % BLOCK):
            raise ValueError(f"apply: group_size must be a positive multiple of {BLOCK} (or None), got "
                             f"{group_size!r}")
        if group_size is None:
            return ("group_size", BLOCK) if quantize == "int4" else None
        return "group_size", group_size
    return None


def _check_units(quantize: Optional[str], unit, layers, what: str) -> None:
    """ValueError listing the (name, in_features) layers whose in_features is not a multiple of unit."""
    if unit is None:
        return
    odd = [f"{name} ({k})" for name, k in layers if k % unit[1]]
    if odd:
        raise ValueError(f"apply: quantize={quantize!r} needs in_features a multiple of {unit[0]} {unit[1]}; these "
                         f"{what} are not: {', '.join(odd[:8])}{', ...' if len(odd) > 8 else ''}")


def _apply_fused(model: torch.nn.Module, r: int, alpha: float, dropout: float, targets: Targets,
                 use_rslora: bool, quantize: Optional[str] = None, blocksize: int = 64,
                 double_quant: bool = False, group_size: Optional[int] = None) -> torch.nn.Module:
    """apply for a model with fused projections: targets matched against the Hugging Face layer names; with
    quantize each adapted projection's whole weight becomes a quantized frozen base (Linear.quantize_base)."""
    projections = model.hf_projections()
    todo = [(lin, names, sizes, [_matches(n, targets) for n in names])
            for lin, names, sizes in projections if lin.lora is None]
    todo = [t for t in todo if any(t[3])]
    if not todo:
        names = [n for lin, ns, _ in projections if lin.lora is None for n in ns]
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ValueError(f"apply: targets {targets!r} match no projection of the model (its layers not yet "
                         f"adapted: {shown or 'none'})")
    _check_units(quantize, _base_unit(quantize, blocksize, group_size),
                 [(names[0], lin.in_features) for lin, names, _, _ in todo], "projections")
    for lin, _, sizes, chosen in todo:
        lin.add_lora(sizes, chosen, r, alpha, dropout, use_rslora)
        if quantize is not None:
            lin.quantize_base(blocksize, double_quant, quantize=quantize, group_size=group_size)
    _freeze(model)
    return model


def _fused_merge(model: torch.nn.Module, merge: bool) -> None:
    if _fused(model):
        for lin, _, _ in model.hf_projections():
            lin.merge_lora(merge)


def merge(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every adapter into its layer's weight (weight += scaling B A): the forward then costs the plain
    linear layers'. Returns the model."""
    for m in lora_modules(model).values():
        m.merge()
    _fused_merge(model, True)
    return model


def unmerge(model: torch.nn.Module) -> torch.nn.Module:
    """Take the merged adapters out of the weights again (weight -= scaling B A). Returns the model."""
    for m in lora_modules(model).values():
        m.unmerge()
    _fused_merge(model, False)
    return model


def _uniform(values: Dict[str, float]):
    """The most common value, and the names whose value differs from it (PEFT's rank_pattern / alpha_pattern)."""
    common = Counter(values.values()).most_common(1)[0][0]
    return common, {name: v for name, v in values.items() if v != common}


def save(model: torch.nn.Module, path: str, base_model_name_or_path: Optional[str] = None) -> None:
    """Write the model's adapters to the directory ``path`` in PEFT's format: adapter_config.json (a LoraConfig:
    r, lora_alpha, lora_dropout, target_modules = the adapted modules' names, use_rslora; rank_pattern /
    alpha_pattern for layers whose rank or alpha differ from the most common) and adapter_model.safetensors
    (``base_model.model.<module>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r), in the adapters' dtype)."""
    from safetensors.torch import save_file

    mods = _adapters(model)
    if not mods:
        raise ValueError("save: the model has no LoRA adapters (tritium.lora.apply adds them)")
    if len({m.use_rslora for m in mods.values()}) > 1:
        raise ValueError("save: PEFT's format has one use_rslora for every layer; the model's layers mix both")
    r, rank_pattern = _uniform({n: m.r for n, m in mods.items()})
    alpha, alpha_pattern = _uniform({n: m.lora_alpha for n, m in mods.items()})
    m0 = next(iter(mods.values()))
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": m0.lora_dropout, "target_modules": sorted(mods),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "use_rslora": m0.use_rslora,
        "bias": "none", "lora_bias": False, "fan_in_fan_out": False, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "inference_mode": True,
    }
    tensors = {}
    for name, m in mods.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().cpu().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().cpu().contiguous()
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


# LoraConfig entries whose non-default values this loader does not implement: (key, default)
_UNSUPPORTED = (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none"), ("lora_bias", False),
                ("modules_to_save", None), ("layers_to_transform", None), ("use_qalora", False),
                ("target_parameters", None), ("trainable_token_indices", None))


def _load_fused(model: torch.nn.Module, pairs: Dict[str, Dict[str, torch.Tensor]], alpha, alpha_pattern,
                p: float, use_rslora: bool) -> Dict[str, Dict[str, torch.Tensor]]:
    """load's part for the row blocks of fused projections (named by their Hugging Face layers): adapters added
    where missing and the saved values copied in. Returns the pairs that name no such block."""
    for lin, names, sizes in model.hf_projections():
        mine = {j: pairs.pop(n) for j, n in enumerate(names) if n in pairs}
        if not mine:
            continue
        ranks = {ab["lora_A"].shape[0] for ab in mine.values()}
        alphas = {_pattern(alpha_pattern, names[j], alpha) for j in mine}
        if len(ranks) > 1 or len(alphas) > 1:
            raise NotImplementedError(f"load: the layers {[names[j] for j in mine]} share one fused projection "
                                      f"and must share rank and alpha, got ranks {sorted(ranks)}, alphas "
                                      f"{sorted(alphas)}")
        r = ranks.pop()
        if lin.lora is None:
            lin.add_lora(sizes, [j in mine for j in range(len(names))], r, alphas.pop(), p, use_rslora)
        parts = lin.lora
        if parts.r != r or not set(mine) <= set(parts.blocks()):
            raise ValueError(f"load: {names[min(mine)]!r} already has an adapter of rank {parts.r} on other "
                             f"layers than the saved one (rank {r})")
        for j, ab in mine.items():
            i = parts.blocks().index(j)
            for which, t in ab.items():
                dst = getattr(parts, which)[i]
                if tuple(t.shape) != tuple(dst.shape):
                    raise ValueError(f"load: {names[j]}.{which} is {tuple(t.shape)} in the adapter, "
                                     f"{tuple(dst.shape)} in the model")
                with torch.no_grad():
                    dst.copy_(t)
    return pairs


def load(model: torch.nn.Module, path: str, dropout: Optional[float] = None) -> torch.nn.Module:
    """Load the adapter saved in the directory ``path`` (by ``save`` or by PEFT's ``save_pretrained``) into
    ``model``: each module named in adapter_model.safetensors becomes a LoRALinear (rank from its tensors, alpha
    from the config's lora_alpha / alpha_pattern, dropout from the config unless ``dropout`` is given), or, if it
    already is one of that rank, takes the saved values; every other parameter is frozen. Returns the model."""
    from safetensors.torch import load_file

    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"load: no {CONFIG_NAME} in {path!r}")
    with open(cfg_path) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA":
        raise NotImplementedError(f"load: peft_type {config['peft_type']!r} is not supported (LORA only)")
    for key, default in _UNSUPPORTED:
        value = config.get(key, default)
        if value not in (default, [], {}):
            raise NotImplementedError(f"load: the adapter's {key} = {value!r} is not supported (tritium.lora "
                                      f"loads plain LoRA adapters: {key} = {default!r})")
    p = config.get("lora_dropout", 0.0) if dropout is None else dropout
    alpha, alpha_pattern = config.get("lora_alpha", 8), config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora", False))
    state = load_file(os.path.join(path, WEIGHTS_NAME))
    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)\.weight", key)
        if m is None:
            raise ValueError(f"load: {WEIGHTS_NAME} holds {key!r}, not a LoRA weight "
                             f"(base_model.model.<module>.lora_A.weight / .lora_B.weight)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    for name, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"load: {WEIGHTS_NAME} has only {sorted(ab)} for the module {name!r}")
    if _fused(model):
        pairs = _load_fused(model, pairs, alpha, alpha_pattern, p, use_rslora)
    for name, ab in sorted(pairs.items()):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"load: the adapter's module {name!r} is not in the model") from None
        r = ab["lora_A"].shape[0]
        if isinstance(module, LoRALinear):
            if module.r != r:
                raise ValueError(f"load: {name!r} is a LoRALinear of rank {module.r}, the adapter's has rank {r}")
        elif isinstance(module, torch.nn.Linear):
            module = LoRALinear.from_linear(module, r, _pattern(alpha_pattern, name, alpha), p, use_rslora)
            _replace(model, name, module)
        else:
            raise ValueError(f"load: the adapter's module {name!r} is a {type(module).__name__}, not a "
                             f"torch.nn.Linear")
        want = {"lora_A": tuple(module.lora_A.shape), "lora_B": tuple(module.lora_B.shape)}
        for which, t in ab.items():
            if tuple(t.shape) != want[which]:
                raise ValueError(f"load: {name}.{which} is {tuple(t.shape)} in the adapter, {want[which]} in the "
                                 f"model")
            with torch.no_grad():
                getattr(module, which).copy_(t)
    _freeze(model)
    return model
