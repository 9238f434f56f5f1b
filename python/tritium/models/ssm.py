"""A Mamba (Mamba-1) language model on tritium's fused ops, with its plain-PyTorch twin in the same class.

    model = MambaLM(MambaConfig(vocab_size=50280, d_model=768, n_layer=24))          # impl="tritium"
    twin = MambaLM(model.config, impl="torch").load_state_dict(model.state_dict())   # the reference twin
    logits = model(input_ids)                                   # (batch, L, vocab), differentiable
    tokens = model.generate(input_ids, max_new_tokens=20)       # constant-size recurrent state, no KV cache

Per layer: h = h + mixer(norm(h)), the mixer being mamba_ssm's ``Mamba`` block (Hugging Face transformers'
``MambaMixer``): in_proj to [x | z] (2 * d_inner), the depthwise causal conv1d over x with bias and SiLU, x_proj to
[dt | B | C] (dt_rank + 2 * d_state), dt_proj's weight on dt (its bias is the scan's delta_bias, softplus'd with
it), the selective scan with A = -exp(A_log), the skip D and the gate silu(z), out_proj back to d_model. Then the
final RMSNorm and the LM head (tied to the embedding by default).

impl="tritium" runs the conv, the scan, the decoding-step updates and the norms through tritium's ops
(``tritium.causal_conv1d``, ``tritium.selective_scan``, ``tritium.causal_conv1d_update``,
``tritium.selective_state_update``, ``tritium.rms_norm``); impl="torch" runs ``tritium.reference``'s plain-torch
functions of the same names, which are mamba_ssm's and causal-conv1d's reference implementations. The projections
are torch's linear in both. Both have the same parameters under the names of transformers' ``MambaForCausalLM``
state_dict, so ``MambaLM(MambaConfig.from_hf(hf.config)).load_state_dict(hf.state_dict())`` loads a Hugging Face
Mamba (mamba_ssm's ``backbone.embedding.weight`` name is accepted as well).

Decoding keeps, per layer, the last d_conv inputs of the conv (batch, d_inner, d_conv) and the scan's state
(batch, d_inner, d_state) (float32) in a ``MambaState``: ``prefill`` fills it from the prompt (the scan's final
state), ``step`` advances it by one token in place (causal_conv1d_update, selective_state_update).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tritium
from tritium import reference

IMPLS = ("tritium", "torch")


@dataclass(frozen=True)
class _Ops:
    causal_conv1d: object
    causal_conv1d_update: object
    selective_scan: object
    selective_state_update: object
    rms_norm: object


_OPS = {
    "tritium": _Ops(tritium.causal_conv1d, tritium.causal_conv1d_update, tritium.selective_scan,
                    tritium.selective_state_update, tritium.rms_norm),
    "torch": _Ops(reference.causal_conv1d, reference.causal_conv1d_update, reference.selective_scan,
                  reference.selective_state_update, reference.rms_norm),
}


def _ops(impl: str) -> _Ops:
    if impl not in _OPS:
        raise ValueError(f"MambaLM: impl must be one of {IMPLS}, got {impl!r}")
    return _OPS[impl]


@dataclass
class MambaConfig:
    """Mamba-1's hyperparameters (mamba_ssm's MambaConfig / ``Mamba`` arguments; transformers' names in
    ``from_hf``). d_inner = expand * d_model; dt_rank "auto" is ceil(d_model / 16). The dt_* fields only matter
    for the initialisation (mamba_ssm's: dt = exp(U(log dt_min, log dt_max)) clamped to dt_init_floor, stored as
    dt_proj's bias through the inverse softplus; dt_proj's weight U(+-dt_scale / sqrt(dt_rank)))."""
    vocab_size: int = 50280
    d_model: int = 768
    n_layer: int = 24
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: Union[int, str] = "auto"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    bias: bool = False                 # in_proj and out_proj biases (transformers' use_bias)
    conv_bias: bool = True
    residual_in_fp32: bool = True      # the residual stream in float32 (matters for 16-bit weights only)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0
    rescale_prenorm_residual: bool = True   # out_proj's init divided by sqrt(n_layer) (mamba_ssm's default)

    def __post_init__(self):
        if self.dt_rank == "auto":
            self.dt_rank = math.ceil(self.d_model / 16)
        if not isinstance(self.dt_rank, int) or self.dt_rank < 1:
            raise ValueError(f"MambaConfig: dt_rank must be a positive int or 'auto', got {self.dt_rank!r}")
        for name in ("vocab_size", "d_model", "n_layer", "d_state", "d_conv", "expand"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"MambaConfig: {name} must be >= 1, got {getattr(self, name)!r}")

    @property
    def d_inner(self) -> int:
        return int(self.expand * self.d_model)

    @classmethod
    def from_hf(cls, hf) -> "MambaConfig":
        """The config of a transformers ``MambaConfig`` (or its dict)."""
        get = hf.get if isinstance(hf, dict) else (lambda k, d=None: getattr(hf, k, d))
        act = get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"MambaConfig.from_hf: hidden_act must be silu, got {act!r}")
        hidden = get("hidden_size")
        return cls(vocab_size=get("vocab_size"), d_model=hidden, n_layer=get("num_hidden_layers"),
                   d_state=get("state_size", 16), d_conv=get("conv_kernel", 4), expand=get("expand", 2),
                   dt_rank=get("time_step_rank", "auto"), norm_eps=get("layer_norm_epsilon", 1e-5),
                   tie_embeddings=get("tie_word_embeddings", True), bias=get("use_bias", False),
                   conv_bias=get("use_conv_bias", True), residual_in_fp32=get("residual_in_fp32", True),
                   dt_min=get("time_step_min", 0.001), dt_max=get("time_step_max", 0.1),
                   dt_init_floor=get("time_step_floor", 1e-4), dt_scale=get("time_step_scale", 1.0),
                   rescale_prenorm_residual=get("rescale_prenorm_residual", False))


@dataclass
class MambaState:
    """The recurrent state of a batch being decoded, the same size at every length: per layer i, conv[i] (batch,
    d_inner, d_conv), the last d_conv inputs of the layer's conv (the model's dtype), and ssm[i] (batch, d_inner,
    d_state), the scan's state (float32; float64 for a float64 model). ``MambaLM.step`` updates both in place."""
    conv: Tensor   # (n_layer, batch, d_inner, d_conv)
    ssm: Tensor    # (n_layer, batch, d_inner, d_state)

    @property
    def batch(self) -> int:
        return self.ssm.shape[1]

    @property
    def nbytes(self) -> int:
        return self.conv.nbytes + self.ssm.nbytes


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight (transformers' MambaRMSNorm), through tritium.rms_norm or torch's."""

    def __init__(self, dim: int, eps: float, impl: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.impl = eps, impl

    def forward(self, x: Tensor) -> Tensor:
        return _ops(self.impl).rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class MambaMixer(nn.Module):
    """mamba_ssm's ``Mamba`` block (transformers' ``MambaMixer``), with its parameter names and shapes."""

    def __init__(self, c: MambaConfig, impl: str):
        super().__init__()
        di, n, r = c.d_inner, c.d_state, c.dt_rank
        self.d_inner, self.d_state, self.d_conv, self.dt_rank, self.impl = di, n, c.d_conv, r, impl
        self.in_proj = nn.Linear(c.d_model, 2 * di, bias=c.bias)
        # nn.Conv1d's weight layout (d_inner, 1, d_conv), as the checkpoints store it; the ops take (d_inner, d_conv)
        self.conv1d = nn.Conv1d(di, di, c.d_conv, groups=di, padding=c.d_conv - 1, bias=c.conv_bias)
        self.x_proj = nn.Linear(di, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, di, bias=True)
        self.A_log = nn.Parameter(torch.empty(di, n))
        self.D = nn.Parameter(torch.empty(di))
        self.out_proj = nn.Linear(di, c.d_model, bias=c.bias)

    @torch.no_grad()
    def reset_parameters(self, c: MambaConfig) -> None:
        """mamba_ssm's initialisation (the projections and the conv keep torch's default init)."""
        for m in (self.in_proj, self.conv1d, self.x_proj, self.dt_proj, self.out_proj):
            m.reset_parameters()
        std = c.dt_rank ** -0.5 * c.dt_scale
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min))
        dt = dt.clamp(min=c.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))   # the inverse of softplus
        # S4D real: A = -(1..d_state) in every channel
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand(self.d_inner, -1))
        self.D.fill_(1.0)
        for m in (self.in_proj, self.out_proj):
            if m.bias is not None:
                m.bias.zero_()
        if c.rescale_prenorm_residual:
            self.out_proj.weight.div_(math.sqrt(c.n_layer))

    def _ssm_params(self) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(A, D, dt_bias, conv weight (d_inner, d_conv)): A, D and the bias in float32 as mamba_ssm passes them."""
        return -torch.exp(self.A_log.float()), self.D.float(), self.dt_proj.bias.float(), self.conv1d.weight.squeeze(1)

    def forward(self, hidden: Tensor, conv_state: Optional[Tensor] = None,
                ssm_state: Optional[Tensor] = None) -> Tensor:
        """hidden (batch, L, d_model) -> (batch, L, d_model). With conv_state (batch, d_inner, d_conv) and
        ssm_state (batch, d_inner, d_state) given (prefill), they are overwritten with the states after the
        sequence."""
        ops = _ops(self.impl)
        L = hidden.shape[1]
        A, D, dt_bias, conv_w = self._ssm_params()
        xz = self.in_proj(hidden).transpose(1, 2)                     # (batch, 2 * d_inner, L)
        x, z = xz.chunk(2, dim=1)
        if conv_state is not None:  # the last d_conv conv inputs, zeros before the sequence
            conv_state.copy_(F.pad(x, (self.d_conv - L, 0)) if L < self.d_conv else x[..., L - self.d_conv:])
        x = ops.causal_conv1d(x, conv_w, self.conv1d.bias, activation="silu")
        x_dbl = self.x_proj(x.transpose(1, 2))                       # (batch, L, dt_rank + 2 * d_state)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_proj.weight @ dt.transpose(1, 2)                # (batch, d_inner, L); the bias goes to the scan
        y = ops.selective_scan(x, dt, A, B.transpose(1, 2), C.transpose(1, 2), D, z, dt_bias, True,
                               ssm_state is not None)
        if ssm_state is not None:
            y, last = y
            ssm_state.copy_(last)
        return self.out_proj(y.transpose(1, 2))

    def step(self, hidden: Tensor, conv_state: Tensor, ssm_state: Tensor) -> Tensor:
        """One token: hidden (batch, d_model) -> (batch, d_model), advancing conv_state and ssm_state in place."""
        ops = _ops(self.impl)
        A, D, dt_bias, conv_w = self._ssm_params()
        x, z = self.in_proj(hidden).chunk(2, dim=-1)                 # (batch, d_inner) each
        x = ops.causal_conv1d_update(x, conv_state, conv_w, self.conv1d.bias, "silu")
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)
        y = ops.selective_state_update(ssm_state, x, dt, A, B, C, D, z, dt_bias, True)
        return self.out_proj(y)


class MambaBlock(nn.Module):
    """h + mixer(norm(h)) (the residual kept in float32 with residual_in_fp32, as transformers and mamba_ssm)."""

    def __init__(self, c: MambaConfig, impl: str):
        super().__init__()
        self.norm = RMSNorm(c.d_model, c.norm_eps, impl)
        self.mixer = MambaMixer(c, impl)
        self.residual_in_fp32 = c.residual_in_fp32

    def _residual(self, h: Tensor) -> Tensor:
        return h.float() if self.residual_in_fp32 and h.dtype in (torch.float16, torch.bfloat16) else h

    def forward(self, h: Tensor, conv_state: Optional[Tensor] = None, ssm_state: Optional[Tensor] = None) -> Tensor:
        out = self.mixer(self.norm(h.to(self.norm.weight.dtype)), conv_state, ssm_state)
        return self._residual(h) + out

    def step(self, h: Tensor, conv_state: Tensor, ssm_state: Tensor) -> Tensor:
        out = self.mixer.step(self.norm(h.to(self.norm.weight.dtype)), conv_state, ssm_state)
        return self._residual(h) + out


class MambaBackbone(nn.Module):
    def __init__(self, c: MambaConfig, impl: str):
        super().__init__()
        self.embeddings = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = nn.ModuleList(MambaBlock(c, impl) for _ in range(c.n_layer))
        self.norm_f = RMSNorm(c.d_model, c.norm_eps, impl)


def _rename_mamba_ssm_keys(module, state_dict, prefix, *args) -> None:
    """Accept mamba_ssm's checkpoint name backbone.embedding.weight (transformers' MambaModel does the same)."""
    old, new = f"{prefix}embedding.weight", f"{prefix}embeddings.weight"
    if old in state_dict and new not in state_dict:
        state_dict[new] = state_dict.pop(old)


class RecurrentLM(nn.Module):
    """generate() for a language model with a constant-size recurrent state: the subclass gives prefill(input_ids,
    last_only=True) -> (logits (batch, vocab), state) and step(token_ids, state) -> logits, advancing the state in
    place (MambaLM, tritium.models.rwkv.RWKV7LM)."""

    def _check_ids(self, input_ids: Tensor, what: str, dims: int) -> None:
        """input_ids must be an integer tensor of dims dimensions ((batch, L) or (batch,)), else a ValueError naming
        the model and the method."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != dims or input_ids.is_floating_point():
            shape = "(batch, L)" if dims == 2 else "(batch,)"
            got = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ValueError(f"{type(self).__name__}.{what}: token ids must be an integer tensor {shape}, got {got}")

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, greedy: bool = True, temperature: float = 1.0,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """The prompts input_ids (batch, L) followed by max_new_tokens tokens each: (batch, L + max_new_tokens).
        greedy picks the argmax; otherwise tokens are sampled from softmax(logits / temperature)."""
        if max_new_tokens < 0:
            raise ValueError(f"{type(self).__name__}.generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        if not greedy and not temperature > 0:
            raise ValueError(f"{type(self).__name__}.generate: temperature must be > 0 to sample, got {temperature}")

        def pick(logits: Tensor) -> Tensor:
            if greedy:
                return logits.argmax(-1)
            probs = torch.softmax(logits.float() / temperature, -1)
            return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

        if max_new_tokens == 0:
            return input_ids
        logits, state = self.prefill(input_ids, last_only=True)
        out = [input_ids]
        for i in range(max_new_tokens):
            token = pick(logits)
            out.append(token[:, None].to(input_ids.dtype))
            if i + 1 < max_new_tokens:
                logits = self.step(token, state)
        return torch.cat(out, dim=1)



class MambaLM(RecurrentLM):
    """Mamba language model: ``model(input_ids (batch, L))`` -> logits (batch, L, vocab) (float32 for 16-bit
    weights, as transformers returns them); ``prefill`` / ``step`` / ``generate`` decode with a MambaState.

    impl: "tritium" (tritium's ops) or "torch" (tritium.reference's: the plain-PyTorch twin). Parameter names are
    transformers' MambaForCausalLM's (backbone.embeddings.weight, backbone.layers.{i}.norm.weight,
    backbone.layers.{i}.mixer.{in_proj,conv1d,x_proj,dt_proj,out_proj}.*, mixer.A_log, mixer.D,
    backbone.norm_f.weight, lm_head.weight)."""

    def __init__(self, config: MambaConfig, impl: str = "tritium"):
        super().__init__()
        _ops(impl)
        self.config, self.impl = config, impl
        self.backbone = MambaBackbone(config, impl)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight   # one Parameter under both names
        self.backbone._register_load_state_dict_pre_hook(_rename_mamba_ssm_keys, with_module=True)
        self._register_load_state_dict_pre_hook(self._fill_tied_head)
        self.reset_parameters()

    def _fill_tied_head(self, state_dict, prefix, *args) -> None:
        """A tied checkpoint may store the embedding only (mamba_ssm's do): the head is that tensor."""
        head, emb = f"{prefix}lm_head.weight", f"{prefix}backbone.embeddings.weight"
        if self.config.tie_embeddings and head not in state_dict:
            alt = f"{prefix}backbone.embedding.weight"
            if emb in state_dict or alt in state_dict:
                state_dict[head] = state_dict[emb if emb in state_dict else alt]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mamba_ssm's initialisation: embedding N(0, 0.02), the mixers' (MambaMixer.reset_parameters), norms 1."""
        c = self.config
        nn.init.normal_(self.backbone.embeddings.weight, std=0.02)
        if not c.tie_embeddings:
            self.lm_head.reset_parameters()
        for layer in self.backbone.layers:
            layer.mixer.reset_parameters(c)
            layer.norm.weight.fill_(1.0)
        self.backbone.norm_f.weight.fill_(1.0)

    # ---- the full-sequence forward (training, scoring) ----
    def _logits(self, h: Tensor) -> Tensor:
        h = self.backbone.norm_f(h.to(self.backbone.norm_f.weight.dtype))
        logits = self.lm_head(h.to(self.lm_head.weight.dtype))
        return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids (batch, L) -> logits (batch, L, vocab). Differentiable in every parameter."""
        self._check_ids(input_ids, "forward", 2)
        h = self.backbone.embeddings(input_ids)
        for layer in self.backbone.layers:
            h = layer(h)
        return self._logits(h)

    # ---- decoding with the recurrent state ----
    def new_state(self, batch: int) -> MambaState:
        """A zero state for `batch` sequences (what the model has before any token)."""
        c, w = self.config, self.lm_head.weight
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        conv = torch.zeros(c.n_layer, batch, c.d_inner, c.d_conv, dtype=w.dtype, device=w.device)
        ssm = torch.zeros(c.n_layer, batch, c.d_inner, c.d_state, dtype=acc, device=w.device)
        return MambaState(conv, ssm)

    @torch.no_grad()
    def prefill(self, input_ids: Tensor, last_only: bool = False) -> Tuple[Tensor, MambaState]:
        """Run the prompts input_ids (batch, L), L >= 1, and return (logits, state): logits (batch, L, vocab)
        ((batch, vocab) of the last position with last_only) and the MambaState after the prompts (no gradient)."""
        self._check_ids(input_ids, "prefill", 2)
        if input_ids.shape[1] == 0:
            raise ValueError("MambaLM.prefill: the prompt must have at least one token")
        state = self.new_state(input_ids.shape[0])
        h = self.backbone.embeddings(input_ids)
        for i, layer in enumerate(self.backbone.layers):
            h = layer(h, state.conv[i], state.ssm[i])
        return self._logits(h[:, -1] if last_only else h), state

    @torch.no_grad()
    def step(self, token_ids: Tensor, state: MambaState) -> Tensor:
        """Feed one token per sequence, token_ids (batch,), and return the next-token logits (batch, vocab);
        the state advances in place (its size does not change)."""
        self._check_ids(token_ids, "step", 1)
        if token_ids.shape[0] != state.batch:
            raise ValueError(f"MambaLM.step: {token_ids.shape[0]} tokens for a state of batch {state.batch}")
        h = self.backbone.embeddings(token_ids)
        for i, layer in enumerate(self.backbone.layers):
            h = layer.step(h, state.conv[i], state.ssm[i])
        return self._logits(h)


__all__ = ["MambaConfig", "MambaLM", "MambaState", "RecurrentLM", "IMPLS"]
