"""torch.library.opcheck over every custom op tritium registers in the ``tritium`` namespace: the schema matches
what the kernel does (mutation, aliasing), the fake (meta) kernel gives the real kernel's output metadata, an op
whose inputs require grad has its autograd registered, and AOTAutograd traces it with dynamic shapes to the
eager results (the path torch.compile takes).

SAMPLES holds representative small inputs per op (one or more argument tuples, with requires_grad on the float
inputs of ops that have an autograd formula). The test list is the set of ops registered with the dispatcher, so
an op added without a sample here fails ``test_opcheck[<op>]``.

test_utils: all four of opcheck's checks. The costly one, test_aot_dispatch_dynamic, traces each sample through
AOTAutograd but compiles no kernels (the CPU ops stay opaque calls), so on inputs this small the whole file stays
well under a minute on two cores.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import pytest
import torch

import tritium  # noqa: F401  (defines the ops and loads their C++ kernels)
from tritium.ops.activations import ACT_NAMES, GATES, LAYOUT_GATE_UP, LAYOUT_SEPARATE, LAYOUT_UP_GATE
from tritium.ops.linear import _panel_width

TEST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")

REGISTERED = sorted(name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                    if name.startswith("tritium::"))


def r(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def g(*shape, dtype=torch.float32):
    """An input that requires grad (for the ops with an autograd formula)."""
    return torch.randn(*shape, dtype=dtype).requires_grad_(True)


Samples = Callable[[], List[Tuple]]
SAMPLES: Dict[str, Samples] = {}


def sample(name: str):
    def register(fn: Samples) -> Samples:
        SAMPLES[name] = fn
        return fn
    return register


# ---- activations: every row of the table, and the gated units ----
_ACT_PARAMS = {"leaky_relu": (0.01, 0.0, 0.0), "elu": (1.0, 1.0, 1.0), "softplus": (1.0, 20.0, 0.0),
               "swish": (1.5, 0.0, 0.0)}

for _name in ACT_NAMES:
    _p = _ACT_PARAMS.get(_name, (0.0, 0.0, 0.0))
    SAMPLES[f"{_name}_fwd"] = lambda p=_p: [(g(3, 37), *p), (g(2, 3, dtype=torch.float64), *p)]
    SAMPLES[f"{_name}_fwd_"] = lambda p=_p: [(r(3, 37), *p)]
    SAMPLES[f"{_name}_bwd"] = lambda p=_p: [(r(3, 37), r(3, 37), *p)]

for _gate in GATES:
    SAMPLES[f"{_gate}_fwd"] = lambda: [(g(3, 10), g(3, 10), LAYOUT_SEPARATE), (g(3, 10), None, LAYOUT_GATE_UP),
                                       (g(3, 10), None, LAYOUT_UP_GATE)]
    SAMPLES[f"{_gate}_bwd"] = lambda: [(r(3, 10), r(3, 10), r(3, 10), LAYOUT_SEPARATE),
                                       (r(3, 5), r(3, 10), None, LAYOUT_GATE_UP)]


@sample("dyt_fwd")
def _():
    return [(g(3, 8), g(1), g(8), g(8))]


@sample("dyt_bwd")
def _():
    return [(r(3, 8), r(3, 8), r(1), r(8), True, True, True), (r(3, 8), r(3, 8), r(1), r(8), False, False, False)]


@sample("swish_beta_fwd")
def _():
    return [(g(3, 8), g(1))]


@sample("swish_beta_bwd")
def _():
    return [(r(3, 8), r(3, 8), r(1), True), (r(3, 8), r(3, 8), r(1), False)]


@sample("prelu_fwd")
def _():
    return [(g(6, 5), g(2), True), (g(4, 3), g(3), False)]


@sample("prelu_bwd")
def _():
    return [(r(6, 5), r(6, 5), r(2), True, True), (r(4, 3), r(4, 3), r(3), False, False)]


@sample("batch_norm_act_fwd")
def _():
    relu = ACT_NAMES.index("relu")
    return [(g(6, 5), g(3), g(3), g(6, 5), True, relu, 0.0, 0.0, 0.0),
            (g(4, 3), g(3), g(3), None, False, -1, 0.0, 0.0, 0.0)]


@sample("batch_norm_act_bwd")
def _():
    gelu = ACT_NAMES.index("gelu")
    return [(r(6, 5), r(6, 5), r(3), r(3), r(6, 5), True, gelu, 0.0, 0.0, 0.0, True),
            (r(4, 3), r(4, 3), r(3), r(3), None, False, -1, 0.0, 0.0, 0.0, False)]


# ---- norms ----
@sample("rms_norm_fwd")
def _():
    return [(g(3, 8), g(8), 1e-6), (g(3, 8), None, 1e-6)]


@sample("rms_norm_bwd")
def _():
    x = r(3, 8)
    rstd = torch.ops.tritium.rms_norm_fwd(x, None, 1e-6)[1]
    return [(r(3, 8), x, r(8), rstd, None, True), (r(3, 8), x, None, rstd, r(3, 8), False)]


@sample("fused_add_rms_norm_fwd")
def _():
    return [(g(3, 8), g(3, 8), g(8), 1e-6)]


@sample("layer_norm_fwd")
def _():
    return [(g(3, 8), g(8), g(8), 1e-5), (g(3, 8), None, None, 1e-5)]


@sample("layer_norm_bwd")
def _():
    x = r(3, 8)
    _, mean, rstd = torch.ops.tritium.layer_norm_fwd(x, None, None, 1e-5)
    return [(r(3, 8), x, r(8), mean, rstd, True, True), (r(3, 8), x, None, mean, rstd, False, False)]


@sample("group_norm_fwd")
def _():
    # (N * groups, channels per group, spatial) blocks: 2 samples x 3 groups of 2 channels x 5, then 2-D input
    return [(g(6, 2, 5), g(6), g(6), 3, 1e-5, True), (g(4, 3, 1), None, None, 2, 1e-5, False)]


@sample("group_norm_bwd")
def _():
    x = r(6, 2, 5)
    _, mean, rstd = torch.ops.tritium.group_norm_fwd(x, None, None, 3, 1e-5, False)
    return [(r(6, 2, 5), x, r(6), r(6), mean, rstd, 3, True, True, True),
            (r(6, 2, 5), x, None, None, mean, rstd, 3, False, False, False)]


# ---- softmax, cross-entropy, kl_div, distillation ----
@sample("softmax_fwd")
def _():
    return [(g(2, 7, 1), 1.0, False), (g(2, 7, 3), -1.0, True)]


@sample("softmax_bwd")
def _():
    y = torch.softmax(r(2, 7, 1), 1)
    return [(r(2, 7, 1), y, 1.0, False), (r(2, 7, 1), y.log(), 1.0, True)]


@sample("cross_entropy_fwd")
def _():
    t = torch.tensor([1, 0, 4, -100])
    return [(g(4, 5), t, None, -100, 0.0, True, True), (r(4, 5), t, r(5), -100, 0.1, False, False)]


@sample("cross_entropy_z_fwd")
def _():
    t = torch.tensor([1, 0, 4, -100])
    return [(g(4, 5), t, None, -100, 0.0, True, True, 1e-3, 3.0),
            (r(4, 5), t, r(5), -100, 0.1, False, False, 0.01, 0.0),
            (g(4, 5), t, r(5), -100, 0.0, False, True, 0.0, 2.0)]


@sample("cross_entropy_bwd")
def _():
    return [(r(4, 5), r(4), torch.float32), (r(4, 5), r(4), torch.bfloat16)]


@sample("fused_linear_cross_entropy_fwd")
def _():
    t = torch.tensor([1, 0, 4, -100, 2])
    return [(g(5, 6), g(7, 6), t, g(7), -100, 0.0, 2, True, True), (r(5, 6), r(7, 6), t, None, -100, 0.1, 3, False,
                                                                    False),
            (g(5, 6), g(7, 6), t, g(7), -100, 0.0, 2, True, True, 1e-3, 5.0),   # z-loss and softcap
            (g(5, 6), r(7, 6), t, r(7), -100, 0.0, 2, True, True, 0.0, 0.0, False)]   # a frozen head: no grad_weight


@sample("fused_linear_cross_entropy_rows")
def _():
    return [(g(5, 6), g(7, 6), torch.tensor([1, 0, 4, -100, 2]), g(7), -100, 0.0, 2),
            (g(5, 6), g(7, 6), torch.tensor([1, 0, 4, -100, 2]), g(7), -100, 0.0, 2, 0.0, 3.0)]


@sample("fused_linear_cross_entropy_bwd")
def _():
    t = torch.tensor([1, 0, 4, -100, 2])
    return [(r(5, 6), r(7, 6), t, r(7), r(5), -100, 0.0, 2), (r(5, 6), r(7, 6), t, None, r(5), -100, 0.0, 5),
            (r(5, 6), r(7, 6), t, r(7), r(5), -100, 0.1, 2, 1e-2, 4.0)]


@sample("kl_div_fwd")
def _():
    # a probability target for log_target=False (the log of a negative one is NaN), log-probabilities for True
    return [(g(3, 5), torch.rand(3, 5).requires_grad_(True), False, True, 1 / 3),
            (g(3, 5), g(3, 5), True, False, 1.0)]


@sample("kl_div_bwd")
def _():
    x, t = r(3, 5), torch.rand(3, 5)
    return [(torch.tensor(0.5), x, t, False, True, True), (r(3, 5), x, t, True, True, False)]


@sample("distill_fwd")
def _():
    t = torch.tensor([1, -100, 4])  # the fused hard-label term, with an ignored row
    return [(g(3, 5), r(3, 5), 0.5, True), (r(3, 5), r(3, 5), 1.0, False),
            (g(3, 5), r(3, 5), 0.5, True, t, -100, 0.25, 0.5), (r(3, 5), r(3, 5), 1.0, False, t, -100, 0.5, 0.5)]


# ---- losses ----
@sample("loss_fwd")
def _():
    from tritium.ops.losses import LOSS_IDS
    bce, logits = LOSS_IDS["binary_cross_entropy"], LOSS_IDS["binary_cross_entropy_with_logits"]
    return [(LOSS_IDS["mse_loss"], g(3, 5), g(3, 5), None, None, 0.0, 0.0, 0.2, True),
            (LOSS_IDS["huber_loss"], g(3, 5), r(3, 5), None, None, 0.5, 0.0, 1.0, False),
            (bce, torch.rand(3, 5).requires_grad_(True), torch.rand(3, 5), torch.rand(5), None, 0.0, 0.0, 1.0, True),
            (logits, g(3, 5), torch.rand(3, 5), torch.rand(3, 5), torch.rand(5), 0.0, 0.0, 1.0, False),
            (LOSS_IDS["sigmoid_focal_loss"], g(2, 3, 5), torch.rand(2, 3, 5).round(), None, None, 0.25, 2.0, 1.0, True)]


@sample("loss_fwd_grad")
def _():
    from tritium.ops.losses import LOSS_IDS
    return [(LOSS_IDS["mse_loss"], g(3, 5), g(3, 5), None, None, 0.0, 0.0, 0.2),
            (LOSS_IDS["binary_cross_entropy_with_logits"], g(3, 5), torch.rand(3, 5), torch.rand(5), torch.rand(5), 0.0,
             0.0, 1.0),
            (LOSS_IDS["sigmoid_focal_loss"], g(2, 3, 5), torch.rand(2, 3, 5).round(), None, None, 0.25, 2.0, 1.0)]


@sample("loss_bwd")
def _():
    from tritium.ops.losses import LOSS_IDS
    return [(LOSS_IDS["l1_loss"], torch.tensor(2.0), r(3, 5), r(3, 5), None, None, 0.0, 0.0, 0.5),
            (LOSS_IDS["quantile_loss"], r(3, 5), r(3, 5), r(3, 5), None, torch.rand(5), 0.0, 0.0, 1.0)]


@sample("loss_rows")
def _():
    from tritium.ops.losses import ROW_CONTRASTIVE, ROW_COSINE, ROW_MULTI_MARGIN, ROW_TRIPLET_SWAP
    return [(ROW_TRIPLET_SWAP, g(4, 6), g(4, 6), g(4, 6), None, None, 1.0, 2.0, 1e-6),
            (ROW_COSINE, g(4, 6), g(4, 6), None, torch.tensor([1.0, -1.0, 1.0, 0.0]), None, 0.1, 0.0, 0.0),
            (ROW_CONTRASTIVE, r(4, 6), g(4, 6), None, torch.tensor([1.0, 0.0, 1.0, 0.0]), None, 2.0, 0.0, 1e-6),
            (ROW_MULTI_MARGIN, g(4, 6), None, None, torch.tensor([0, 5, 2, 2]), torch.rand(6), 1.0, 2.0, 0.0)]


@sample("loss_rows_grad")
def _():
    from tritium.ops.losses import ROW_COSINE, ROW_MULTI_MARGIN, ROW_TRIPLET
    return [(ROW_TRIPLET, torch.full((4,), 0.25), g(4, 6), g(4, 6), g(4, 6), None, None, 1.0, 2.0, 1e-6, True, True,
             True),
            (ROW_COSINE, torch.ones(4), g(4, 6), r(4, 6), None, torch.tensor([1.0, -1.0, 1.0, 0.0]), None, 0.1, 0.0,
             0.0, True, False, False),
            (ROW_MULTI_MARGIN, torch.rand(4), g(4, 6), None, None, torch.tensor([0, 5, 2, 2]), torch.rand(6), 1.0, 2.0,
             0.0, True, False, False)]


@sample("loss_rows_bwd")
def _():
    from tritium.ops.losses import ROW_COSINE, ROW_MULTI_MARGIN, ROW_TRIPLET, ROW_TRIPLET_SWAP, loss_rows
    a, p, n = r(4, 6), r(4, 6), r(4, 6)
    stats = loss_rows(ROW_TRIPLET_SWAP, a, p, n, None, None, 1.0, 2.0, 1e-6)[1]  # the forward's statistics
    x1, x2, y = r(4, 6), r(4, 6), torch.tensor([1.0, -1.0, 1.0, 0.0])
    cos_stats = loss_rows(ROW_COSINE, x1, x2, None, y, None, 0.1, 0.0, 0.0)[1]
    return [(ROW_TRIPLET, r(4), r(4, 6), r(4, 6), r(4, 6), None, None, 1.0, 2.0, 1e-6, True, False, True),
            (ROW_TRIPLET_SWAP, r(4), a, p, n, None, None, 1.0, 2.0, 1e-6, True, True, True, stats),
            (ROW_COSINE, r(4), x1, x2, None, y, None, 0.1, 0.0, 0.0, True, False, True, cos_stats),
            (ROW_MULTI_MARGIN, r(4), r(4, 6), None, None, torch.tensor([0, 5, 2, 2]), None, 1.0, 1.0, 0.0, True, True,
             True)]


@sample("nce_block_fwd")
def _():
    return [(r(3, 6), r(3, 2), r(6), torch.rand(6), True), (r(3, 6), None, r(0), r(0), False),
            (r(3, 6), r(3, 2), r(6), torch.rand(6), True, 8.0)]


@sample("nce_block_bwd_")
def _():
    return [(r(3, 6), r(3), r(3), r(6), r(6), 2), (r(3, 6), r(3), r(3), None, None, -1),
            (r(3, 6), r(3), r(3), r(6), r(6), 2, 8.0)]


@sample("unit_rows")
def _():
    small = g(3, 5)
    with torch.no_grad():
        small[1] *= 1e-14  # a row whose norm is below eps: the clamp's branch
    return [(g(4, 7), 1e-12), (small, 1e-12), (g(2, 3, 5), 0.5)]


@sample("info_nce_fwd")
def _():
    return [(g(6, 4), g(6, 4), None, 5.0, True, 4), (g(6, 4), g(6, 4), g(3, 4), 2.0, False, 16)]


@sample("info_nce_bwd")
def _():
    q, k, n = r(6, 4), r(6, 4), r(3, 4)
    _, lr, lc = torch.ops.tritium.info_nce_fwd(q, k, n, 2.0, True, 4)
    return [(r(6), q, k, n, lr, lc, 2.0, True, 4),
            (r(6), q, k, None, *torch.ops.tritium.info_nce_fwd(q, k, None, 2.0, False, 4)[1:], 2.0, False, 4)]


# ---- attention, paged KV cache, rope, sampling ----
@sample("flash_attn_fwd")
def _():
    mask = r(1, 2, 5, 7).requires_grad_(False)
    return [(g(1, 2, 5, 16), g(1, 1, 7, 16), g(1, 1, 7, 16), None, 0.25, 2, -1, 0, 0.0),
            (g(1, 2, 5, 16), g(1, 2, 7, 16), g(1, 2, 7, 16), mask, 0.25, 0, -1, -1, 5.0)]


@sample("flash_attn_bwd")
def _():
    q, k, v = r(1, 2, 5, 16), r(1, 1, 7, 16), r(1, 1, 7, 16)
    out, lse = torch.ops.tritium.flash_attn_fwd(q, k, v, None, 0.25, 2, 3, 0, 0.0)
    return [(r(1, 2, 5, 16), q, k, v, out, lse, None, None, 0.25, 2, 3, 0, 0.0),
            (r(1, 2, 5, 16), q, k, v, out, lse, r(1, 2, 5), None, 0.25, 2, 3, 0, 0.0)]


def _pools():
    k_pool, v_pool = r(4, 4, 2, 16), r(4, 4, 2, 16)
    return k_pool, v_pool, torch.tensor([[3, 1], [0, 2]], dtype=torch.int32), torch.tensor([6, 3],
                                                                                           dtype=torch.int32)


@sample("paged_attention_decode")
def _():
    k_pool, v_pool, tables, lens = _pools()
    return [(r(2, 4, 16), k_pool, v_pool, tables, lens, 0.25, None, None),
            (r(2, 4, 16), k_pool, v_pool, tables, lens, 0.25, 3.0, 2)]


@sample("append_kv")
def _():
    k_pool, v_pool, _, _ = _pools()
    return [(r(3, 2, 16), r(3, 2, 16), k_pool, v_pool, torch.tensor([5, -1, 12]))]


@sample("rope_fwd")
def _():
    cos, sin = tritium.rope_tables(16, 8)
    pos = torch.tensor([0, 3, 7, 15])
    return [(g(4, 2, 8), g(4, 1, 8), cos, sin, pos, False, False), (g(4, 2, 10), g(4, 1, 10), cos, sin, pos, True,
                                                                   True)]


@sample("sample_fwd")
def _():
    params = torch.tensor([[1.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0], [0.7, 3, 0.9, 0.05, 1.2, 0.1, 0.2]])
    history = torch.tensor([[1, 2, -1], [4, 4, 0]])
    return [(r(2, 9), torch.rand(2), params, None, None, None),
            (r(2, 9), torch.rand(2), params, history, torch.tensor([[3], [-1]]), torch.tensor([[2.0], [0.0]]))]


# ---- RNN cells and scans ----
@sample("lstm_cell_fwd")
def _():
    return [(r(3, 16), r(3, 4))]


@sample("lstm_cell_bwd")
def _():
    c = r(3, 4)
    h, c_new, act = torch.ops.tritium.lstm_cell_fwd(r(3, 16), c)
    return [(r(3, 4), r(3, 4), act, c_new, c)]


@sample("gru_cell_fwd")
def _():
    return [(r(3, 12), r(3, 12), r(3, 4))]


@sample("gru_cell_bwd")
def _():
    h = r(3, 4)
    _, saved = torch.ops.tritium.gru_cell_fwd(r(3, 12), r(3, 12), h)
    return [(r(3, 4), saved, h)]


@sample("lstm_scan_fwd")
def _():
    return [(r(5, 2, 16), r(16, 4), r(2, 4), r(2, 4), False), (r(5, 2, 16), r(16, 4), r(2, 4), r(2, 4), True)]


@sample("lstm_scan_bwd")
def _():
    w, h0, c0 = r(16, 4), r(2, 4), r(2, 4)
    hs, cs, acts = torch.ops.tritium.lstm_scan_fwd(r(5, 2, 16), w, h0, c0, False)
    return [(r(5, 2, 4), r(2, 4), w, h0, c0, cs, acts, False)]


@sample("gru_scan_fwd")
def _():
    return [(r(5, 2, 12), r(12, 4), r(12), r(2, 4), False), (r(5, 2, 12), r(12, 4), None, r(2, 4), True)]


@sample("causal_conv1d_fwd")
def _():
    return [(g(2, 5, 9), g(5, 4), g(5), None, True), (g(2, 5, 9), g(5, 3), None, g(2, 5, 2), False)]


@sample("causal_conv1d_bwd")
def _():
    return [(r(2, 5, 9), r(2, 5, 9), r(5, 4), r(5), r(2, 5, 3), True),
            (r(2, 5, 9), r(2, 5, 9), r(5, 4), None, None, False)]


@sample("causal_conv1d_update")
def _():
    return [(r(2, 5, 1), r(2, 5, 3), r(5, 4), r(5), True), (r(2, 5, 3), r(2, 5, 6), r(5, 4), None, False)]


def _kan_grid(n_in, grid_size=4, order=3):
    return (torch.arange(-order, grid_size + order + 1) * (2.0 / grid_size) - 1.0).expand(n_in, -1).contiguous()


@sample("kan_spline_fwd")
def _():
    return [(g(6, 3), _kan_grid(3), g(3, 7, 5), 3), (r(4, 2), _kan_grid(2, 2, 1), g(2, 3, 4), 1)]


@sample("kan_spline_bwd")
def _():
    return [(r(6, 5), r(6, 3), _kan_grid(3), r(3, 7, 5), 3, True, True),
            (r(6, 5), r(6, 3), _kan_grid(3), r(3, 7, 5), 3, False, True)]


@sample("wavenet_gate_fwd")
def _():
    return [(g(2, 6, 9), None), (g(2, 6, 9), g(2, 6, 9)), (r(1, 4, 5), r(1, 4, 5))]


@sample("wavenet_gate_bwd")
def _():
    return [(r(2, 3, 9), r(2, 6, 9), None), (r(2, 3, 9), r(2, 6, 9), r(2, 6, 9))]


@sample("max_pool2d_fwd")
def _():
    return [(g(6, 8, 8), 2, 2), (g(3, 7, 9), 3, 2), (r(2, 5, 5, dtype=torch.float64), 5, 5)]


@sample("max_pool2d_bwd")
def _():
    idx = torch.ops.tritium.max_pool2d_fwd(r(6, 7, 9), 3, 2)[1]
    return [(r(6, 2, 4), idx, 3, 2, 7, 9)]


@sample("lora_linear_fwd")
def _():
    return [(g(6, 5), r(7, 5), r(7), g(2, 5), g(7, 2), None, 1.5),
            (g(6, 5), r(7, 5), None, g(1, 5), g(7, 1), (r(6, 5) > 0).float(), 2.0)]


@sample("lora_linear_bwd")
def _():
    return [(r(6, 7), r(6, 5), r(7, 5), r(2, 5), r(7, 2), None, r(6, 2), 1.5, True),
            (r(6, 7), r(6, 5), r(7, 5), r(2, 5), r(7, 2), (r(6, 5) > 0).float(), r(6, 2), 1.5, False)]


def _dequant_bases():
    """The frozen bases of the dequantised route (lora.py: q0, q1, q2, meta): NF4 (K = 2 blocks of 64) and int4
    with mins, int8 per channel, N = 19, K = 128."""
    from tritium.ops.quant import QuantizedWeight

    w = torch.randn(19, 128)
    out = [tritium.quantize_nf4(w, 64).lora_parts()]
    out += [QuantizedWeight.quantize(w, mode, 32 if mode == "int4" else None).lora_parts() for mode in ("int4", "int8")]
    return [(q0, q1, q2, [code, *meta]) for (q0, q1, q2, meta), code in zip(out, (0, 1, 1))]


@sample("lora_dequant_fwd")
def _():
    return [(g(6, 128), *b, r(19), g(2, 128), g(19, 2), None, 1.5) for b in _dequant_bases()] + [
        (g(6, 128, dtype=torch.bfloat16), *_dequant_bases()[1], None, g(1, 128, dtype=torch.bfloat16),
         g(19, 1, dtype=torch.bfloat16), (r(6, 128) > 0).bfloat16(), 2.0)]


@sample("lora_dequant_bwd")
def _():
    return [(r(6, 19), r(6, 128), *b, r(2, 128), r(19, 2), None, r(6, 2), 1.5, True) for b in _dequant_bases()] + [
        (r(6, 19), r(6, 128), *_dequant_bases()[0], r(2, 128), r(19, 2), (r(6, 128) > 0).float(), r(6, 2), 1.5,
         False)]


def _scan_inputs(grad: bool):
    """u, delta, A, B (2 groups), C, D, z, delta_bias of a small Mamba scan (delta positive, A negative)."""
    f = g if grad else r
    u, z = f(2, 4, 11), f(2, 4, 11)
    delta = (torch.rand(2, 4, 11) * 0.5).requires_grad_(grad)
    A = (-torch.rand(4, 3) - 0.5).requires_grad_(grad)
    return u, delta, A, f(2, 2, 3, 11), f(2, 2, 3, 11), f(4), z, f(4)


@sample("selective_scan_fwd")
def _():
    u, delta, A, B, C, D, z, bias = _scan_inputs(True)
    return [(u, delta, A, B, C, D, z, bias, True, 4), (u, delta, A, B, C, None, None, None, False, 8)]


@sample("selective_scan_bwd")
def _():
    u, delta, A, B, C, D, z, bias = _scan_inputs(False)
    _, states = torch.ops.tritium.selective_scan_fwd(u, delta, A, B, C, D, z, bias, True, 4)
    return [(r(2, 4, 11), u, delta, A, B, C, D, z, bias, True, 4, states, r(2, 4, 3)),
            (r(2, 4, 11), u, delta, A, B, C, None, None, None, True, 4, states, None)]


@sample("selective_state_update")
def _():
    x, dt, A = r(2, 4), torch.rand(2, 4), -torch.rand(4, 3)
    return [(r(2, 4, 3), x, dt, A, r(2, 2, 3), r(2, 2, 3), r(4), r(2, 4), r(4), True),
            (r(2, 4, 3), x, dt, A, r(2, 1, 3), r(2, 1, 3), None, None, None, False)]


def _wkv_inputs(grad):
    """RWKV-7's r, w (log decay), k, v, a, b: (B 2, T 5, H 2, K 3), v with V 4."""
    f = g if grad else r
    w = (-torch.rand(2, 5, 2, 3) * 0.6).requires_grad_(grad)
    return f(2, 5, 2, 3), w, f(2, 5, 2, 3), f(2, 5, 2, 4), f(2, 5, 2, 3), f(2, 5, 2, 3)


@sample("wkv7_fwd")
def _():
    ins = _wkv_inputs(True)
    return [(*ins, 0.5, g(2, 2, 3, 4), 2), (*ins, 0.5, None, 8)]


@sample("wkv7_bwd")
def _():
    ins = _wkv_inputs(False)
    h0 = r(2, 2, 3, 4)
    _, states = torch.ops.tritium.wkv7_fwd(*ins, 0.5, h0, 2)
    return [(r(2, 5, 2, 4), *ins, 0.5, h0, 2, states, r(2, 2, 3, 4)),
            (r(2, 5, 2, 4), *ins, 0.5, None, 2, states, None)]


@sample("wkv7_step")
def _():
    return [(r(2, 2, 3, 4), *(x[:, 0] for x in _wkv_inputs(False)), 0.5)]


@sample("wkv6_fwd")
def _():
    r_, w, k, v, _, _ = _wkv_inputs(True)
    return [(r_, k, v, w, g(2, 3), 0.5, g(2, 2, 3, 4), 2), (r_, k, v, w, g(2, 3), 0.5, None, 8)]


@sample("wkv6_bwd")
def _():
    r_, w, k, v, _, _ = _wkv_inputs(False)
    u, h0 = r(2, 3), r(2, 2, 3, 4)
    _, states = torch.ops.tritium.wkv6_fwd(r_, k, v, w, u, 0.5, h0, 2)
    return [(r(2, 5, 2, 4), r_, k, v, w, u, 0.5, h0, 2, states, r(2, 2, 3, 4)),
            (r(2, 5, 2, 4), r_, k, v, w, u, 0.5, None, 2, states, None)]


@sample("wkv6_step")
def _():
    r_, w, k, v, _, _ = _wkv_inputs(False)
    return [(r(2, 2, 3, 4), r_[:, 0], k[:, 0], v[:, 0], w[:, 0], r(2, 3), 0.5)]


def _mlstm_inputs(grad):
    """xLSTM's mLSTM q, k (B 2, H 2, T 5, DK 3), v (DV 4), gate preactivations i, f (2, 2, 5)."""
    f = g if grad else r
    return f(2, 2, 5, 3), f(2, 2, 5, 3), f(2, 2, 5, 4), f(2, 2, 5), f(2, 2, 5)


@sample("mlstm_fwd")
def _():
    ins = _mlstm_inputs(True)
    return [(*ins, 0.5, 1e-6, g(2, 2, 3, 4), g(2, 2, 3), r(2, 2), 2), (*ins, 0.5, 1e-6, None, None, None, 16)]


@sample("mlstm_bwd")
def _():
    ins = _mlstm_inputs(False)
    h0 = (r(2, 2, 3, 4), r(2, 2, 3), r(2, 2))
    _, Cs, ns, ms = torch.ops.tritium.mlstm_fwd(*ins, 0.5, 1e-6, *h0, 2)
    return [(r(2, 2, 5, 4), *ins, 0.5, 1e-6, Cs, ns, ms, 2, r(2, 2, 3, 4), r(2, 2, 3)),
            (r(2, 2, 5, 4), *ins, 0.5, 1e-6, Cs, ns, ms, 2, None, None)]


@sample("mlstm_step")
def _():
    q, k, v, i, f = (x[:, :, 0].contiguous() for x in _mlstm_inputs(False))
    return [(q, k, v, i, f, r(2, 2, 3, 4), r(2, 2, 3), r(2, 2), 0.5, 1e-6)]


@sample("slstm_fwd")
def _():
    wx, R, s = g(2, 5, 24), g(4, 2, 3, 3), r(2, 6)
    return [(wx, R, None, None, None, None), (wx, R, g(2, 6), g(2, 6), s.abs() + 1, r(2, 6))]


@sample("slstm_bwd")
def _():
    wx, R = r(2, 5, 24), r(4, 2, 3, 3)
    y, states, gates = torch.ops.tritium.slstm_fwd(wx, R, None, None, None, None)
    return [(r(2, 5, 6), wx, R, None, None, None, None, states, gates, None, None, None),
            (r(2, 5, 6), wx, R, None, None, None, None, states, gates, r(2, 6), r(2, 6), r(2, 6))]


@sample("gru_scan_bwd")
def _():
    w, h0 = r(12, 4), r(2, 4)
    hs, saved = torch.ops.tritium.gru_scan_fwd(r(5, 2, 12), w, r(12), h0, False)
    return [(r(5, 2, 4), w, h0, hs, saved, False)]


@sample("rnn_scan_fwd")
def _():
    return [(r(5, 2, 4), r(4, 4), r(2, 4), False, False), (r(5, 2, 4), r(4, 4), r(2, 4), True, True)]


@sample("rnn_scan_bwd")
def _():
    w, h0 = r(4, 4), r(2, 4)
    return [(r(5, 2, 4), w, h0, torch.ops.tritium.rnn_scan_fwd(r(5, 2, 4), w, h0, reverse, relu), reverse, relu)
            for reverse, relu in ((False, False), (True, True))]


# ---- products with a weight matrix ----
@sample("linear_small")
def _():
    return [(r(3, 9), r(5, 9)), (r(1, 9, dtype=torch.bfloat16), r(5, 9, dtype=torch.bfloat16))]


@sample("mm_pooled")
def _():
    return [(r(70, 9), r(9, 5), r(5)), (r(3, 9), r(9, 5), None)]


@sample("linear_wgrad")
def _():
    return [(r(600, 9), r(600, 13), True), (r(5, 9), r(5, 13), False)]


@sample("mm_acc_")
def _():
    return [(torch.zeros(5, 3), r(5, 7, dtype=torch.bfloat16), r(7, 3, dtype=torch.bfloat16)),
            (torch.zeros(5, 3), r(5, 7), r(7, 3))]


@sample("pack_linear")
def _():
    return [(r(70, 33),), (r(33, 70).t(),)]


@sample("linear_packed")
def _():
    w = r(70, 33)
    return [(r(5, 33), torch.ops.tritium.pack_linear(w), 70, r(70)), (r(5, 33), torch.ops.tritium.pack_linear(w), 70,
                                                                      None)]


@sample("pack_linear_glu")
def _():
    return [(r(4 * (_panel_width(torch.float32) // 2), 9),)]


@sample("linear_packed_swiglu")
def _():
    n = 4 * (_panel_width(torch.float32) // 2)
    return [(r(5, 9), torch.ops.tritium.pack_linear_glu(r(n, 9)), n)]


# ---- quantized weights: 4-bit with mins, 8-bit symmetric with float32 scales, odd N and K ----
def _quant_logical(bits, n=19, k=72, group=32, mins=True, sdt=torch.float16):
    ng = -(-(-(-k // 32) * 32) // group)
    q = torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8)
    return q, (torch.rand(n, ng) * 0.1).to(sdt), (r(n, ng) * 0.1).to(sdt) if mins else None, bits, group


def _quant_packed():
    out = []
    for bits, mins, sdt in ((4, True, torch.float16), (8, False, torch.float32)):
        q, s, m, bits, group = _quant_logical(bits, mins=mins, sdt=sdt)
        qd, sp, mp = torch.ops.tritium.quant_pack(q, s, m, bits, group)
        out.append((qd, sp, mp if m is not None else None, bits, group, q.shape[0], q.shape[1]))
    return out


@sample("quant_pack")
def _():
    return [_quant_logical(4), _quant_logical(8, mins=False, sdt=torch.float32), _quant_logical(8, group=16,
                                                                                               mins=False)]


@sample("quant_unpack")
def _():
    return _quant_packed()


@sample("serve_decode")
def _():
    """A 2-layer tiny Llama's decode step of two sequences (lengths 6 and 3 with the new token) over the pools of
    _pools' shape, with float and quantized projections."""
    from tritium.models.llama import build

    out = []
    for quant in (False, True):
        m = build("tiny").init_random(generator=torch.Generator().manual_seed(0))
        if quant:
            m.quantize_("int8", int8_act=1)    # one and two int8 terms (Linear.int8_terms)
        weights, ints = m._decode_args(2)
        c = m.config
        pools = [r(4, 4, c.n_kv_heads, c.head_dim) for _ in range(2 * c.n_layers)]
        tables, lens = torch.tensor([[3, 1], [0, 2]], dtype=torch.int32), torch.tensor([6, 3], dtype=torch.int32)
        out.append((r(2, c.dim), weights, ints, pools, m.norm, m.rope_cos, m.rope_sin, torch.tensor([5, 2]),
                    torch.tensor([5, 2]), tables, lens, c.n_heads, c.norm_eps, c.head_dim ** -0.5))
    return out


@sample("quant_linear")
def _():
    return [(g(3, 72, dtype=dt), *w, act) for w in _quant_packed() for dt, act in
            ((torch.float32, 0), (torch.bfloat16, 1), (torch.float32, 2))]


@sample("quant_linear_dx")
def _():
    return [(r(3, 19), *w) for w in _quant_packed()]


@sample("quant_dequantize")
def _():
    return [(*w, torch.float32, None) for w in _quant_packed()] + [
        (*_quant_packed()[0], torch.bfloat16, torch.tensor([3, 0, 18]))]


# ---- preference losses: two pairs (DPO) and four KTO sequences, an ignored prompt, chunks across sequences ----
@sample("fused_linear_sequence_loss")
def _():
    target = torch.randint(0, 11, (4, 5))
    target[:, :2] = -100
    return [(r(4, 5, 8), r(11, 8), target, r(11), r(4), torch.empty(0), torch.zeros(()), "dpo_sigmoid", [0.1, 0.0],
             -100, 3, True),
            (r(4, 5, 8), r(11, 8), target, r(11), r(4), torch.empty(0), torch.zeros(()), "dpo_sigmoid", [0.1, 0.0],
             -100, 3, True, False),  # a frozen LM head: no weight or bias gradient
            (r(4, 5, 8), r(11, 8), target, None, r(4), torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor(0.2), "kto",
             [0.1, 1.0, 1.0], -100, 4, False)]


# ---- optimizer steps: lists of odd-sized tensors, amsgrad / momentum, master weights, a tensor lr ----
def _zeros_like(ts):
    return [torch.zeros_like(t) for t in ts]


@sample("adamw_step_")
def _():
    ps = [r(7), r(3, 5)]
    masters, p16 = [r(7), r(3, 5)], [r(7, dtype=torch.bfloat16), r(3, 5, dtype=torch.bfloat16)]
    steps = [torch.zeros(()), torch.zeros(())]
    return [(ps, [r(7), r(3, 5)], _zeros_like(ps), _zeros_like(ps), _zeros_like(ps), steps, [], None, 1e-3, 0.9,
             0.999, 1e-2, 1e-8, False),
            (masters, [r(7, dtype=torch.bfloat16), r(3, 5, dtype=torch.bfloat16)], _zeros_like(masters),
             _zeros_like(masters), [], [torch.zeros(()), torch.zeros(())], p16, torch.tensor(1e-3), 0.0, 0.9, 0.999,
             0.0, 1e-8, True)]


@sample("sgd_step_")
def _():
    ps = [r(7), r(3, 5)]
    masters, p16 = [r(7)], [r(7, dtype=torch.bfloat16)]
    return [(ps, [r(7), r(3, 5)], [], [], None, 1e-2, 0.0, 0.0, 0.0, False, False, False),
            (ps, [r(7), r(3, 5)], _zeros_like(ps), [], torch.tensor(1e-2), 0.0, 1e-2, 0.9, 0.0, True, True, False),
            (masters, [r(7, dtype=torch.bfloat16)], _zeros_like(masters), p16, None, 1e-2, 0.0, 0.9, 0.1, False,
             False, True)]


# ---- NF4 (bitsandbytes' layout): odd N, K = 2 blocks of 64; decode-sized and GEMM-sized rows ----
def _nf4(n=19, k=128, bs=64):
    w = tritium.quantize_nf4(torch.randn(n, k), bs)
    return w.data.view(-1), w.absmax, n, k, bs


def _nf4_fwd(m, dtype, bias):
    qd, am, n, k, bs = _nf4()
    return g(m, k, dtype=dtype), qd, am, r(n, dtype=dtype) if bias else None, n, k, bs


@sample("nf4_linear_fwd")
def _():
    return [_nf4_fwd(3, torch.float32, True), _nf4_fwd(40, torch.bfloat16, False)]


@sample("nf4_linear_dx")
def _():
    return [(r(3, 19), *_nf4()), (r(40, 19), *_nf4())]


@sample("nf4_dequantize")
def _():
    return [(*_nf4(), torch.float32), (*_nf4(7, 256, 256), torch.bfloat16)]


# ---- mixture of experts: 7 tokens, top-2 of 3 experts (expert 1 without a token in the second sample) ----
def _moe_rows(idx):
    from tritium.ops.moe import group_by_expert
    _, tokens, offsets = group_by_expert(torch.tensor(idx), 3)
    return tokens, offsets


@sample("moe_experts_fwd")
def _():
    t1, o1 = _moe_rows([[0, 1], [2, 0], [1, 2], [0, 2], [1, 0], [2, 1], [0, 1]])
    t2, o2 = _moe_rows([[0, 2]] * 7)
    return [(g(7, 5), g(3, 8, 5), g(3, 5, 4), t1, o1, g(14)),
            (g(7, 5, dtype=torch.float64), g(3, 8, 5, dtype=torch.float64), g(3, 5, 4, dtype=torch.float64), t2,
             o2, g(14, dtype=torch.float64))]


@sample("moe_experts_infer")
def _():
    t1, o1 = _moe_rows([[0, 1], [2, 0], [1, 2], [0, 2], [1, 0], [2, 1], [0, 1]])
    return [(r(7, 5), r(3, 8, 5), r(3, 5, 4), t1, o1, r(14))]


@sample("moe_experts_bwd")
def _():
    t1, o1 = _moe_rows([[0, 1], [2, 0], [1, 2], [0, 2], [1, 0], [2, 1], [0, 1]])
    return [(r(7, 5), r(7, 5), r(3, 8, 5), r(3, 5, 4), t1, o1, r(14), r(14, 8), True),
            (r(7, 5), r(7, 5), r(3, 8, 5), r(3, 5, 4), t1, o1, r(14), r(14, 8), False)]


# ---- graph message passing: 7 nodes, node 3 without incoming edges, a self loop and a duplicate edge ----
def _graph():
    from tritium.ops.graph import graph_csc
    rowptr = torch.tensor([0, 2, 5, 6, 6, 8, 9, 11])
    col = torch.tensor([1, 4, 0, 2, 2, 6, 0, 5, 3, 1, 6])
    return rowptr, col, graph_csc(rowptr, col, 7)


@sample("graph_agg")
def _():
    rowptr, col, csc = _graph()
    return [(g(7, 5), rowptr, col, g(11), *csc, 0), (g(7, 5), rowptr, col, None, *csc, 1),
            (g(7, 5), rowptr, col, g(11), *csc, 2), (g(7, 3, dtype=torch.float64), rowptr, col, None, None, None,
                                                      None, 0)]


@sample("graph_agg_bwd")
def _():
    rowptr, col, csc = _graph()
    x, w = r(7, 5), r(11)
    arg = torch.ops.tritium.graph_agg(x, rowptr, col, w, None, None, None, 2)[1]
    none = torch.empty(0, dtype=torch.int64)
    return [(r(7, 5), x, rowptr, col, w, none, *csc, 0, True, True),
            (r(7, 5), x, rowptr, col, w, arg, *csc, 2, True, True),
            (r(7, 5), x, rowptr, col, None, none, *csc, 1, True, False)]


@sample("gat_fwd")
def _():
    rowptr, col, csc = _graph()
    return [(g(7, 2, 3), g(7, 2), g(7, 2), rowptr, col, *csc, 0.2),
            (g(7, 1, 4), g(7, 1), g(7, 1), rowptr, col, None, None, None, 0.1)]


@sample("gat_bwd")
def _():
    rowptr, col, csc = _graph()
    x, a, b = r(7, 2, 3), r(7, 2), r(7, 2)
    lse = torch.ops.tritium.gat_fwd(x, a, b, rowptr, col, None, None, None, 0.2)[1]
    return [(r(7, 2, 3), x, a, b, rowptr, col, lse, *csc, 0.2)]


def test_every_registered_op_has_a_sample():
    """The table names only registered ops (a renamed or removed op leaves no stale sample)."""
    assert REGISTERED, "no tritium ops registered"
    assert sorted(set(SAMPLES) - set(REGISTERED)) == []


@pytest.mark.parametrize("name", REGISTERED)
def test_opcheck(name):
    assert name in SAMPLES, f"tritium::{name} has no sample inputs in tests/ops/test_opcheck.py: add one to SAMPLES"
    op = getattr(torch.ops.tritium, name).default
    for args in SAMPLES[name]():
        torch.library.opcheck(op, args, test_utils=TEST_UTILS)
