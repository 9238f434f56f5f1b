"""Context-parallel (ring) attention on torch.distributed, over tritium's flash attention ops.

Each rank holds a slice of the sequence of q, k and v. Every rank's K/V block travels around the ring of ranks
(``torch.distributed.batch_isend_irecv``: each step sends the piece in hand to the next rank and receives the
previous rank's, posted before the local piece's attention so the transfer overlaps it), in a few pieces, one
round of the ring per piece, so a rank buffers two pieces rather than two whole blocks. Every rank attends its
queries to each piece with ``tritium::flash_attn_fwd`` and merges the partial results with their log-sum-exp.
The backward sends the pieces around again, with their dK/dV accumulators travelling alongside and arriving
back at their owner after one full turn; each piece's backward (``tritium::flash_attn_bwd``) is given the global
output and log-sum-exp, so its gradients are exactly that piece's share of the whole attention's.

Causal attention uses the zigzag layout (load balance): a sequence of N positions is cut into 2 * world chunks
(lengths as even as possible, the first N % (2 * world) one longer) and rank r holds chunks r and
2 * world - 1 - r, concatenated. Every rank then has the same amount of work at each step: its own block is
causal, a block from a lower rank is fully visible to all its queries but only through that block's first chunk,
a block from a higher rank is fully visible to its second chunk only. ``zigzag_shard`` / ``zigzag_gather`` convert
between a full sequence and this layout. Non-causal attention takes any split of the sequence (per-rank lengths
may differ, and q's from k's and v's).

Before any transfer, every rank all-gathers a small table of its arguments' metadata (shapes, dtypes, flags) and
validates the whole table the same way, so bad input on one rank makes every rank raise the same error naming
that rank, instead of leaving the others waiting in the ring.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import struct
import time
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops._library import acc_dtype, unit_last
from ..ops.attention import flash_attn_bwd, flash_attn_fwd

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # metadata codes 1..4; 0: anything else
_KV_TAG, _DKV_TAG = 0, 2  # k and v (grads: dk and dv) travel with tags t and t + 1


# ---- the zigzag layout ----
def zigzag_lengths(seq_len: int, world_size: int) -> List[int]:
    """The 2 * world_size chunk lengths a sequence of seq_len positions is cut into (the first seq_len % (2 *
    world_size) chunks one longer than the rest; chunks are empty when seq_len < 2 * world_size)."""
    if world_size < 1 or seq_len < 0:
        raise ValueError(f"zigzag_lengths: expected seq_len >= 0 and world_size >= 1, got {seq_len}, {world_size}")
    n = 2 * world_size
    return [seq_len // n + (1 if i < seq_len % n else 0) for i in range(n)]


def zigzag_local_lengths(seq_len: int, world_size: int) -> List[Tuple[int, int]]:
    """Per rank, the lengths of its two chunks (chunk r and chunk 2 * world_size - 1 - r)."""
    c = zigzag_lengths(seq_len, world_size)
    return [(c[r], c[2 * world_size - 1 - r]) for r in range(world_size)]


def zigzag_shard(x: Tensor, rank: int, world_size: int, dim: int = 2) -> Tensor:
    """Rank ``rank``'s part of the full sequence x (sequence along ``dim``) in the zigzag layout: chunks rank and
    2 * world_size - 1 - rank, concatenated (a new tensor)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"zigzag_shard: rank must be in [0, {world_size}), got {rank}")
    chunks = torch.split(x, zigzag_lengths(x.shape[dim], world_size), dim=dim)
    return torch.cat([chunks[rank], chunks[2 * world_size - 1 - rank]], dim=dim)


def zigzag_unshard(parts: Sequence[Tensor], dim: int = 2) -> Tensor:
    """The full sequence from every rank's part (parts[r] from rank r, as zigzag_shard made them)."""
    world = len(parts)
    seq_len = sum(p.shape[dim] for p in parts)
    lengths = zigzag_local_lengths(seq_len, world)
    for r, p in enumerate(parts):
        if p.shape[dim] != sum(lengths[r]):
            raise ValueError(f"zigzag_unshard: part {r} has {p.shape[dim]} positions along dim {dim}; the zigzag "
                             f"layout of {seq_len} positions on {world} ranks gives it {sum(lengths[r])}")
    chunks: List[Optional[Tensor]] = [None] * (2 * world)
    for r, p in enumerate(parts):
        chunks[r], chunks[2 * world - 1 - r] = torch.split(p, lengths[r], dim=dim)
    return torch.cat(chunks, dim=dim)


def zigzag_gather(x: Tensor, group: Optional[dist.ProcessGroup] = None, dim: int = 2) -> Tensor:
    """Collective: the full sequence on every rank from each rank's zigzag part x (parts may differ in length
    along dim, as the layout gives them; other dims must match)."""
    world = dist.get_world_size(group)
    device = _meta_device(group)
    n = torch.tensor([x.shape[dim]], dtype=torch.int64, device=device)
    ns = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(ns, n, group=group)
    lens = [int(t.item()) for t in ns]
    longest = max(lens)
    pad = list(x.shape)
    pad[dim] = longest
    mine = x.new_zeros(pad)
    mine.narrow(dim, 0, x.shape[dim]).copy_(x)
    got = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(got, mine, group=group)
    return zigzag_unshard([g.narrow(dim, 0, n_) for g, n_ in zip(got, lens)], dim=dim)


# ---- communication statistics (for `tritium bench dist`) ----
@dataclasses.dataclass
class RingStats:
    """What ring_attention's transfers cost on this rank while collecting: bytes sent, seconds spent waiting for
    transfers to finish (the part of communication not hidden behind attention), transfers posted."""
    bytes_sent: int = 0
    wait_s: float = 0.0
    transfers: int = 0


_STATS: Optional[RingStats] = None


@contextlib.contextmanager
def collect_stats() -> Iterator[RingStats]:
    """Count this rank's ring_attention communication inside the block (forward and backward)."""
    global _STATS
    prev, _STATS = _STATS, RingStats()
    try:
        yield _STATS
    finally:
        _STATS = prev


# ---- the ring ----
def _meta_device(group) -> torch.device:
    """Where collectives of this group take tensors: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _Ring:
    def __init__(self, group):
        if not dist.is_initialized():
            raise RuntimeError("ring_attention: torch.distributed is not initialized (call "
                               "torch.distributed.init_process_group first, e.g. under torchrun)")
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

        def peer(r):
            return r if group is None else dist.get_global_rank(group, r)

        self.next = peer((self.rank + 1) % self.world)
        self.prev = peer((self.rank - 1) % self.world)

    def exchange(self, send: Sequence[Tensor], recv: Sequence[Tensor], tag: int) -> list:
        """Post sends of ``send`` to the next rank and receives into ``recv`` from the previous one (one batch);
        returns the works to wait on."""
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag + i) for i, t in enumerate(send)]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag + i) for i, t in enumerate(recv)]
        if not ops:
            return []
        if _STATS is not None:
            _STATS.bytes_sent += sum(t.numel() * t.element_size() for t in send)
            _STATS.transfers += len(send)
        return dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(works: list) -> None:
        t0 = time.perf_counter()
        for w in works:
            w.wait()
        if _STATS is not None:
            _STATS.wait_s += time.perf_counter() - t0


class _Buffers:
    """Two flat buffers the pieces arriving from the ring alternate between (a piece is received into one while
    the other is read and sent), each viewed as the (batch, heads, len, dim) tensors of the piece in it."""

    def __init__(self, numel: int, dtype, device, count: int = 2):
        self.flat = [torch.empty(numel, dtype=dtype, device=device) for _ in range(count)]

    def views(self, i: int, shapes: Sequence[Tuple[int, ...]]) -> List[Tensor]:
        out, at = [], 0
        for s in shapes:
            n = math.prod(s)
            out.append(self.flat[i % len(self.flat)][at:at + n].view(s))
            at += n
        return out


# ---- metadata check: every rank validates every rank's arguments the same way ----
_M_Q, _M_K, _M_V = 0, 6, 12   # per tensor: [kind (0 a 4-D tensor, 1 not a tensor, 2 other ndim), ndim, 4 dims]
_M_DTYPES, _M_CAUSAL, _M_SCALE, _M_DEVICE, _M_GRAD, _M_LEN = 18, 21, 22, 23, 24, 25


def _metadata(q, k, v, causal, scale) -> List[int]:
    """This rank's arguments as integers; never raises, so every rank reaches the all-gather."""
    m = [0] * _M_LEN
    for at, t in ((_M_Q, q), (_M_K, k), (_M_V, v)):
        if not isinstance(t, Tensor):
            m[at] = 1
            continue
        m[at], m[at + 1] = (0 if t.dim() == 4 else 2), t.dim()
        if t.dim() == 4:
            m[at + 2:at + 6] = list(t.shape)
    for i, t in enumerate((q, k, v)):
        m[_M_DTYPES + i] = _DTYPES.index(t.dtype) + 1 if isinstance(t, Tensor) and t.dtype in _DTYPES else 0
    m[_M_CAUSAL] = int(bool(causal))
    try:
        sc = float("nan") if scale is None else float(scale)
    except (TypeError, ValueError):
        sc = float("inf")  # not a number: reported as such below
    m[_M_SCALE] = struct.unpack("<q", struct.pack("<d", sc))[0]
    m[_M_DEVICE] = {"cpu": 0, "cuda": 1}.get(q.device.type, 2) if isinstance(q, Tensor) else -1
    m[_M_GRAD] = int(torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in (q, k, v)))
    return m


def _validate(table: List[List[int]]) -> None:
    """Raise (identically on every rank) for the first rank whose arguments are bad or disagree with rank 0's."""
    def dims(m, at):
        return tuple(m[at + 2:at + 6])

    for r, m in enumerate(table):
        where = f"ring_attention: rank {r}:"
        for name, at in (("q", _M_Q), ("k", _M_K), ("v", _M_V)):
            if m[at] == 1:
                raise ValueError(f"{where} {name} must be a 4-D (batch, heads, seq, dim) tensor, got a non-tensor")
            if m[at] == 2:
                raise ValueError(f"{where} {name} must be a 4-D (batch, heads, seq, dim) tensor, got {m[at + 1]} dims")
        q, k, v = dims(m, _M_Q), dims(m, _M_K), dims(m, _M_V)
        if k[0] != q[0] or v[0] != q[0] or k[1] != v[1] or k[2] != v[2]:
            raise ValueError(f"{where} k {k} and v {v} must share batch, heads and seq, with q's batch {q[0]}")
        if k[3] != q[3]:
            raise ValueError(f"{where} k's head dim {k[3]} must equal q's {q[3]}")
        if k[1] == 0 or q[1] % k[1] != 0:
            raise ValueError(f"{where} kv heads {k[1]} must divide query heads {q[1]}")
        codes = m[_M_DTYPES:_M_DTYPES + 3]
        if 0 in codes or len(set(codes)) != 1:
            raise TypeError(f"{where} q, k, v must have one floating dtype of "
                            f"{', '.join(str(d) for d in _DTYPES)}, got codes {codes} (0: another dtype)")
        if m[_M_DEVICE] == 1 and (codes[0] == 4 or not (16 <= q[3] <= 256 and 16 <= v[3] <= 256)):
            raise ValueError(f"{where} on GPU the flash kernels take float32/bfloat16/float16 and head dims 16..256, "
                             f"got {_DTYPES[codes[0] - 1]} and head dims {q[3]}, {v[3]}")
        sc = struct.unpack("<d", struct.pack("<q", m[_M_SCALE]))[0]
        if math.isinf(sc) or (not math.isnan(sc) and not sc > 0):
            raise ValueError(f"{where} scale must be None or a positive number, got "
                             f"{'a non-number' if math.isinf(sc) else sc}")
        if m[_M_CAUSAL] and q[2] != k[2]:
            raise ValueError(f"{where} causal ring attention needs q, k, v over the same positions, got q's seq "
                             f"{q[2]} and k's {k[2]}")
    m0 = table[0]
    for r, m in enumerate(table[1:], 1):
        for what, sl in (("batch", [_M_Q + 2, _M_K + 2]), ("query heads", [_M_Q + 3]), ("kv heads", [_M_K + 3]),
                         ("q/k head dim", [_M_Q + 5]), ("v head dim", [_M_V + 5]),
                         ("dtype", [_M_DTYPES]), ("causal", [_M_CAUSAL]), ("scale", [_M_SCALE]),
                         ("device type", [_M_DEVICE]), ("grad mode (inputs requiring grad)", [_M_GRAD])):
            got, want = [m[i] for i in sl], [m0[i] for i in sl]
            if got != want:
                show = {"dtype": lambda c: str(_DTYPES[c[0] - 1]),
                        "scale": lambda c: repr(struct.unpack("<d", struct.pack("<q", c[0]))[0])}.get(
                            what, lambda c: str(c[0]))
                raise ValueError(f"ring_attention: rank {r}: {what} {show(got)} differs from rank 0's {show(want)}; "
                                 "every rank must pass the same batch, heads, head dims, dtype, causal, scale and "
                                 "requires_grad, only the sequence split differs")
    if m0[_M_CAUSAL]:
        world = len(table)
        n = sum(m[_M_Q + 4] for m in table)
        want = zigzag_local_lengths(n, world)
        for r, m in enumerate(table):
            if m[_M_Q + 4] != sum(want[r]):
                raise ValueError(f"ring_attention: rank {r}: holds {m[_M_Q + 4]} positions, but causal ring attention "
                                 f"takes the zigzag layout, which gives rank {r} {sum(want[r])} of the {n} positions "
                                 f"on {world} ranks (tritium.distributed.zigzag_shard)")


# ---- the attention ----
# Each rank's K/V block goes around the ring in _PIECES pieces, one round of the ring per piece: a rank holds one
# piece in hand and one arriving (and, in the backward, one dK/dV accumulator in hand and one arriving), so the
# ring's buffers are 2 / _PIECES of a block each, at the cost of _PIECES times more, smaller transfers and
# attention calls. Causal: each of the block's two zigzag chunks is cut into _PIECES / 2 pieces, so a piece lies
# in one chunk of the global sequence and its visibility is one rectangle or one causal triangle of queries.
_PIECES = 8


def _split(n: int, parts: int) -> List[Tuple[int, int]]:
    """[start, stop) of `parts` near-equal contiguous pieces of range(n) (the first n % parts one longer)."""
    out, at = [], 0
    for i in range(parts):
        m = n // parts + (1 if i < n % parts else 0)
        out.append((at, at + m))
        at += m
    return out


class _Plan:
    """The pieces of every rank's K/V block and which of this rank's query rows see each, from the all-gathered
    lengths (every rank derives the same pieces, so a receiver knows each piece's size)."""

    def __init__(self, ring: _Ring, table, causal: bool):
        self.ring, self.causal = ring, causal
        W = ring.world
        self.n = 1 if W == 1 else _PIECES  # pieces per block (one process: the whole block, no buffers anyway)
        self.q_len = [m[_M_Q + 4] for m in table]
        self.kv_len = [m[_M_K + 4] for m in table]
        # per owner: [(start, stop) in its local K/V, global chunk, offset of start in that chunk]
        self.pieces = []
        if causal:
            self.first = [a for a, _ in zigzag_local_lengths(sum(self.q_len), W)]
            for s in range(W):
                a, n = self.first[s], self.kv_len[s]
                half = self.n // 2 or 1
                self.pieces.append([(i, j, s, i) for i, j in _split(a, half)]
                                   + [(a + i, a + j, 2 * W - 1 - s, i) for i, j in _split(n - a, half)])
        else:
            self.pieces = [[(i, j, -1, 0) for i, j in _split(n, self.n)] for n in self.kv_len]

    def owner(self, step: int) -> int:
        return (self.ring.rank - step) % self.ring.world

    def span(self, step: int, piece: int) -> Tuple[int, int]:
        return self.pieces[self.owner(step)][piece][:2]

    def rows(self, step: int, piece: int) -> Optional[Tuple[Tuple[int, int], bool]]:
        """(this rank's query rows that see the piece, causal), or None when nothing is computed. Causal: rank r
        holds chunks r and 2W-1-r; a piece of chunk b is seen by every query when b < r, by the second chunk's
        when r < b < 2W-1-r, by no query when b > 2W-1-r, and when it is one of r's own chunks, causally by the
        rows from the piece's own position on (top-left aligned: the first such row sees the piece's first key)."""
        r, lq = self.ring.rank, self.q_len[self.ring.rank]
        k0, k1, b, c0 = self.pieces[self.owner(step)][piece]
        if k0 == k1:
            return None
        if not self.causal:
            rows, causal = (0, lq), False
        else:
            a, last = self.first[r], 2 * self.ring.world - 1 - r
            if b < r:
                rows, causal = (0, lq), False
            elif b == r:
                rows, causal = (c0, lq), True
            elif b < last:
                rows, causal = (a, lq), False
            elif b == last:
                rows, causal = (a + c0, lq), True
            else:
                return None
        return None if rows[0] == rows[1] else (rows, causal)

    def shapes(self, step: int, piece: int, k: Tensor, v: Tensor) -> List[Tuple[int, ...]]:
        k0, k1 = self.span(step, piece)
        return [(*k.shape[:2], k1 - k0, k.shape[3]), (*v.shape[:2], k1 - k0, v.shape[3])]

    def piece_numel(self, k: Tensor, v: Tensor) -> int:
        """Elements of the largest piece (a buffer holds its k then its v)."""
        per_row = k.shape[0] * k.shape[1] * k.shape[3] + v.shape[0] * v.shape[1] * v.shape[3]
        return per_row * max(j - i for ps in self.pieces for i, j, _, _ in ps)


def _rows(t: Tensor, span) -> Tensor:
    return t[:, :, span[0]:span[1]]


def _wide(t: Tensor, acc) -> Tensor:
    """A K/V piece in the accumulation dtype (a copy for 16-bit pieces, which travel in their own dtype: the
    pieces' attention runs in float32, see _RingAttention)."""
    return t if t.dtype == acc else t.to(acc)


def _merge(out: Tensor, lse: Tensor, ob: Tensor, lb: Tensor) -> None:
    """out, lse (accumulated, in place) <- the softmax merge of themselves with a piece's (ob, lb)."""
    new = torch.logaddexp(lse, lb)
    safe = new.masked_fill(new == float("-inf"), 0.0)  # rows no key has reached yet: weights 0, not nan
    out.mul_((lse - safe).exp_().unsqueeze(-1)).addcmul_(ob, (lb - safe).exp_().unsqueeze(-1))
    lse.copy_(new)


def _nonempty(ts: Sequence[Tensor]) -> List[Tensor]:
    return [t for t in ts if t.numel()]  # an empty piece is not sent (both ends know it is empty)


def _own_piece(t: Tensor, span, world: int) -> Tensor:
    return _rows(t, span) if world == 1 else _rows(t, span).contiguous()  # transfers need contiguous tensors


class _RingAttention(torch.autograd.Function):
    """16-bit inputs: the K/V pieces travel in their dtype, but each piece's attention (forward and backward) runs
    on float32 copies, so the partial outputs and gradients merged across pieces are not each rounded to 16 bits
    (merging rounded partials, whose magnitudes can exceed the final output's, would break the tolerance rule
    single-process attention meets)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, ring, plan):
        B, H, L, _ = q.shape
        acc = acc_dtype(q.dtype)
        W = ring.world
        cq = q.to(acc)
        bufs = _Buffers(plan.piece_numel(k, v) if W > 1 else 0, k.dtype, k.device, 2 if W > 1 else 0)
        out = lse = None
        g = 0  # steps so far: pieces arrive in the buffers alternately
        for p in range(len(plan.pieces[0])):
            cur = [_own_piece(k, plan.span(0, p), W), _own_piece(v, plan.span(0, p), W)]
            for t in range(W):
                works, nxt = [], None
                if t + 1 < W:
                    nxt = bufs.views(g, plan.shapes(t + 1, p, k, v))
                    works = ring.exchange(_nonempty(cur), _nonempty(nxt), _KV_TAG)
                blk = plan.rows(t, p)
                if blk is not None:
                    rows, causal = blk
                    ob, lb = flash_attn_fwd(_rows(cq, rows), _wide(cur[0], acc), _wide(cur[1], acc), None, scale, 0,
                                            -1, 0 if causal else -1, 0.0)
                    if out is None and rows == (0, L):
                        out, lse = ob, lb  # the first piece over every row starts the sums
                    else:
                        if out is None:
                            out = q.new_zeros((B, H, L, v.shape[3]), dtype=acc)
                            lse = q.new_full((B, H, L), float("-inf"), dtype=acc)
                        _merge(_rows(out, rows), _rows(lse, rows), ob, lb)
                    del ob, lb
                ring.wait(works)
                if nxt is not None:
                    cur = nxt
                g += 1
        del cur, bufs
        if out is None:  # no key anywhere (empty k/v on every rank): rows that see no key give 0 and lse -inf
            out = q.new_zeros((B, H, L, v.shape[3]), dtype=acc)
            lse = q.new_full((B, H, L), float("-inf"), dtype=acc)
        out = out.to(q.dtype)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.ring, ctx.plan = scale, ring, plan
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        ring, plan, scale = ctx.ring, ctx.plan, ctx.scale
        W = ring.world
        # Every rank runs the ring (its neighbours wait on it) even when its own gradients are None.
        if dout is None:
            dout = torch.zeros_like(out)
        acc = acc_dtype(q.dtype)
        cq, cout, cdout = q.to(acc), out.to(acc), unit_last(dout).to(acc)
        L = q.shape[2]
        kv_bufs = _Buffers(plan.piece_numel(k, v) if W > 1 else 0, k.dtype, k.device, 2 if W > 1 else 0)
        dkv_bufs = _Buffers(plan.piece_numel(k, v) if W > 1 else 0, acc, k.device, 2 if W > 1 else 0)
        dq = None
        dk, dv = torch.empty(k.shape, dtype=acc, device=k.device), torch.empty(v.shape, dtype=acc, device=v.device)
        g = 0
        for p in range(len(plan.pieces[0])):
            own = plan.span(0, p)
            cur = [_own_piece(k, own, W), _own_piece(v, own, W)]
            dkv_works: list = []
            dkv = None  # the accumulator of the piece in hand's dK, dV (it arrived from the previous rank)
            for t in range(W):
                kv_works, nxt = [], None
                if t + 1 < W:
                    nxt = kv_bufs.views(g, plan.shapes(t + 1, p, k, v))
                    kv_works = ring.exchange(_nonempty(cur), _nonempty(nxt), _KV_TAG)
                blk = plan.rows(t, p)
                grads = None
                if blk is not None:
                    rows, causal = blk
                    dl = None if dlse is None else _rows(dlse, rows).contiguous()
                    grads = flash_attn_bwd(_rows(cdout, rows), _rows(cq, rows), _wide(cur[0], acc),
                                           _wide(cur[1], acc), _rows(cout, rows), _rows(lse, rows).contiguous(), dl,
                                           None, scale, 0, -1, 0 if causal else -1, 0.0)
                    if dq is None and rows == (0, L):
                        dq = grads[0]  # the first piece over every row starts the sum (no zeroed buffer)
                    else:
                        if dq is None:
                            dq = torch.zeros(q.shape, dtype=acc, device=q.device)
                        _rows(dq, rows).add_(grads[0])
                if t == 0:
                    # the own piece's accumulator starts here: in the final dk, dv alone, else in a ring buffer
                    dkv = ([_rows(dk, own), _rows(dv, own)] if W == 1
                           else dkv_bufs.views(g, plan.shapes(0, p, k, v)))
                    for d, gr in zip(dkv, (None, None) if grads is None else grads[1:]):
                        if gr is None:
                            d.zero_()
                        else:
                            d.copy_(gr)
                else:
                    ring.wait(dkv_works)  # dkv (received last step) is this piece's accumulator
                    if grads is not None:
                        dkv[0].add_(grads[1])
                        dkv[1].add_(grads[2])
                del grads
                if W > 1:
                    # pass the accumulator on; the one arriving after the round's last step is the own piece's
                    shapes = plan.shapes(t + 1, p, k, v)
                    incoming = (dkv_bufs.views(g + 1, shapes) if t + 1 < W
                                else [torch.empty(s_, dtype=acc, device=k.device) for s_ in shapes])
                    dkv_works = ring.exchange(_nonempty(dkv), _nonempty(incoming), _DKV_TAG)
                    dkv = incoming
                ring.wait(kv_works)
                if nxt is not None:
                    cur = nxt
                g += 1
            if W > 1:
                ring.wait(dkv_works)
                _rows(dk, own).copy_(dkv[0])
                _rows(dv, own).copy_(dkv[1])
        del cur, kv_bufs, dkv_bufs, dkv
        if dq is None:
            dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, group: Optional[dist.ProcessGroup] = None,
                   scale: Optional[float] = None, return_lse: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Context-parallel attention: softmax(q k^T * scale) v over the whole sequence split across the ranks of
    ``group`` (default: the world). Each rank passes its slice: q (batch, heads, L_rank, D), k (batch, heads_kv,
    S_rank, D), v (batch, heads_kv, S_rank, Dv), heads_kv dividing heads (GQA); it gets back its slice of the output
    (batch, heads, L_rank, Dv) and, with ``return_lse``, of the log-sum-exp (batch, heads, L_rank), float32
    (float64 for float64 input), differentiable.

    ``causal``: the sequence must be in the zigzag layout (``zigzag_shard``; q, k, v over the same positions),
    and query position i sees key positions j <= i of the whole sequence. Non-causal: any split, each rank's
    queries see every rank's keys. Every rank must call it (a collective) with the same batch, heads, head dims,
    dtype, causal, scale and requires_grad; bad or disagreeing input on any rank raises the same error on every
    rank, naming the rank. Differentiable in q, k and v (the backward is also a collective)."""
    ring = _Ring(group)
    meta = torch.tensor(_metadata(q, k, v, causal, scale), dtype=torch.int64, device=_meta_device(group))
    gathered = [torch.empty_like(meta) for _ in range(ring.world)]
    dist.all_gather(gathered, meta, group=group)
    table = [t.tolist() for t in gathered]
    _validate(table)
    plan = _Plan(ring, table, bool(causal))
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = _RingAttention.apply(unit_last(q), unit_last(k), unit_last(v), sc, ring, plan)
    return (out, lse) if return_lse else out


__all__ = ["ring_attention", "zigzag_lengths", "zigzag_local_lengths", "zigzag_shard", "zigzag_unshard",
           "zigzag_gather", "collect_stats", "RingStats"]
