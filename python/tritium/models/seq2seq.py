"""A sequence-to-sequence model with attention on tritium ops (issue 26): a GRU encoder-decoder with Luong
("general", Luong, Pham and Manning 2015) or Bahdanau (additive, Bahdanau, Cho and Bengio 2014) attention over
characters, greedy and beam-search decoding.

- Encoder: character embedding -> a bidirectional GRU as two GRUs (B, S, 2H): sources are right-padded
  (``encode_batch``), the forward GRU reads them as they are and the backward one each source's real characters
  reversed (a gather, undone on its outputs), so neither direction reads padding before a real character; the
  attention masks the pads. The decoder's first state is tanh(Linear(mean of the encoder outputs over the real
  positions)). A source gives the same outputs alone or padded in a batch.
- Decoder: character embedding -> GRU (teacher forcing in training: the whole target in one recurrent op), then
  for each step attention with the general score q_t . (W_a h_s) / sqrt(H) over the encoder outputs h_s (one
  scaled_dot_product_attention call, pads masked), the attentional state tanh(W_c [context; q_t]) and the output
  logits. No input feeding, so training runs the decoder's time loop inside the GRU op rather than in Python.
  ``attention="bahdanau"`` scores additively instead: v . tanh(W_a h_s + U_a q_t) (the additive score over the
  decoder's current state, Luong's placement; Bahdanau's own decoder reads the previous state and feeds the
  context into the GRU, which would put the time loop back in Python), softmax over the real positions.
- ``greedy`` and ``beam_search`` decode one GRU step at a time from the same weights; ``loss`` is the
  cross-entropy of the next character.

``impl="tritium"``: tritium.nn.GRU (one fused cell kernel per step, forward and backward), tritium's
scaled_dot_product_attention (or softmax), tanh, linear layers and cross_entropy; ``impl="torch"``: the same module
tree on torch ops (torch.nn.GRU, oneDNN on CPU), with the same state_dict.
"""
from __future__ import annotations

import string
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .zoo import _ZooImpl

PAD, BOS, EOS = 0, 1, 2
CHARS = " ,-" + string.digits + string.ascii_letters
VOCAB = ["<pad>", "<s>", "</s>"] + list(CHARS)
_INDEX = {c: i + 3 for i, c in enumerate(CHARS)}


def encode(text: str) -> List[int]:
    """Character ids of text (characters outside CHARS raise ValueError naming them)."""
    bad = sorted({c for c in text if c not in _INDEX})
    if bad:
        raise ValueError(f"encode: characters outside the vocabulary: {bad}")
    return [_INDEX[c] for c in text]


def decode(ids: Sequence[int]) -> str:
    """The text of ids up to the first </s> (<pad> and <s> skipped)."""
    out = []
    for i in ids:
        if i == EOS:
            break
        if i > EOS:
            out.append(VOCAB[i])
    return "".join(out)


def encode_batch(texts: Sequence[str], left: bool = False) -> Tensor:
    """(B, max length) int64 ids, padded with <pad> on the right (or the left)."""
    ids = [encode(t) for t in texts]
    n = max(len(i) for i in ids)
    return torch.tensor([[PAD] * (n - len(i)) + i if left else i + [PAD] * (n - len(i)) for i in ids])


def targets(texts: Sequence[str]) -> Tuple[Tensor, Tensor]:
    """(decoder inputs <s> + text, labels text + </s>), each (B, L + 1), right-padded (labels padded with -100)."""
    ids = [encode(t) for t in texts]
    n = max(len(i) for i in ids) + 1
    inp = torch.tensor([[BOS] + i + [PAD] * (n - 1 - len(i)) for i in ids])
    lab = torch.tensor([i + [EOS] + [-100] * (n - 1 - len(i)) for i in ids])
    return inp, lab


ATTENTIONS = ("luong", "bahdanau")


class Seq2Seq(_ZooImpl):
    """GRU encoder-decoder with Luong or Bahdanau attention over a character vocabulary (VOCAB)."""

    def __init__(self, embed: int = 64, hidden: int = 128, vocab: int = len(VOCAB), impl: str = "tritium",
                 attention: str = "luong"):
        super().__init__(impl)
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        self.hidden, self.attention = hidden, attention
        self.src_embed = nn.Embedding(vocab, embed, padding_idx=PAD)
        self.enc_fwd = self.ops.gru(embed, hidden, batch_first=True)
        self.enc_bwd = self.ops.gru(embed, hidden, batch_first=True)
        self.init = self.ops.Linear(2 * hidden, hidden)
        self.tgt_embed = nn.Embedding(vocab, embed, padding_idx=PAD)
        self.decoder = self.ops.gru(embed, hidden, batch_first=True)
        self.attn = self.ops.Linear(2 * hidden, hidden, bias=False)     # W_a: keys from the encoder outputs
        if attention == "bahdanau":
            self.attn_query = self.ops.Linear(hidden, hidden)             # U_a: the decoder state's term
            self.attn_v = self.ops.Linear(hidden, 1, bias=False)          # v: the score of tanh(keys + queries)
        if impl == "tritium":
            import tritium

            self._softmax = tritium.softmax
        else:
            self._softmax = torch.softmax
        self.combine = self.ops.Linear(3 * hidden, hidden)               # W_c [context; q]
        self.out = self.ops.Linear(hidden, vocab)

    def encode(self, src: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """src (B, S) right-padded ids -> (encoder outputs (B, S, 2H), keys (B, S, H), additive mask (B, 1, S):
        -inf at pads, decoder state h0 (1, B, H))."""
        real = (src != PAD)
        lengths = real.sum(1, keepdim=True)
        j = torch.arange(src.shape[1], device=src.device)[None]
        rev = torch.where(j < lengths, lengths - 1 - j, j)   # each source's real characters reversed (an involution)
        fwd, _ = self.enc_fwd(self.src_embed(src))
        bwd, _ = self.enc_bwd(self.src_embed(src.gather(1, rev)))
        enc = torch.cat([fwd, bwd.gather(1, rev[..., None].expand_as(bwd))], -1)
        mean = (enc * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp(min=1)
        h0 = self.ops.tanh(self.init(mean))[None]
        mask = torch.zeros(real.shape, dtype=enc.dtype, device=src.device).masked_fill(~real, float("-inf"))
        return enc, self.attn(enc), mask[:, None], h0

    def _step_logits(self, q: Tensor, enc: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        """decoder states q (B, T, H) -> logits (B, T, V) through attention over the encoder outputs."""
        if self.attention == "luong":
            ctx = self.ops.scaled_dot_product_attention(q, keys, enc, attn_mask=mask.expand(-1, q.shape[1], -1))
        else:
            feat = self.ops.tanh(keys[:, None] + self.attn_query(q)[:, :, None])        # (B, T, S, H)
            score = self.attn_v(feat).squeeze(-1) + mask                                # (B, T, S), -inf at pads
            ctx = self._softmax(score, -1) @ enc                                          # (B, T, 2H)
        return self.out(self.ops.tanh(self.combine(torch.cat([ctx, q], -1))))

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher forcing: src (B, S), decoder inputs (B, T) -> logits (B, T, V)."""
        enc, keys, mask, h0 = self.encode(src)
        q, _ = self.decoder(self.tgt_embed(tgt_in), h0)
        return self._step_logits(q, enc, keys, mask)

    def loss(self, src: Tensor, tgt_in: Tensor, labels: Tensor) -> Tensor:
        logits = self(src, tgt_in)
        return self.ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    @torch.no_grad()
    def greedy(self, src: Tensor, max_len: int = 16) -> Tensor:
        """(B, <= max_len) ids: the most likely next character each step, until every row has emitted </s>."""
        enc, keys, mask, h = self.encode(src)
        tok = torch.full((src.shape[0], 1), BOS, dtype=torch.long, device=src.device)
        out, done = [], torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        for _ in range(max_len):
            q, h = self.decoder(self.tgt_embed(tok), h)
            tok = self._step_logits(q, enc, keys, mask).argmax(-1)
            tok = tok.masked_fill(done[:, None], PAD)
            out.append(tok)
            done |= tok[:, 0] == EOS
            if done.all():
                break
        return torch.cat(out, 1)

    @torch.no_grad()
    def beam_search(self, src: Tensor, beam: int = 4, max_len: int = 16) -> Tensor:
        """(B, <= max_len) ids: the highest total log-probability sequence among ``beam`` hypotheses kept per
        source (a finished hypothesis keeps its score and only extends by <pad>)."""
        B, V = src.shape[0], self.out.out_features
        enc, keys, mask, h = self.encode(src)
        enc, keys, mask = (t.repeat_interleave(beam, 0) for t in (enc, keys, mask))
        h = h.repeat_interleave(beam, 1)
        score = torch.full((B, beam), float("-inf"), device=src.device)
        score[:, 0] = 0                                          # one live hypothesis at the start
        tok = torch.full((B * beam, 1), BOS, dtype=torch.long, device=src.device)
        seqs = torch.zeros(B * beam, 0, dtype=torch.long, device=src.device)
        done = torch.zeros(B * beam, dtype=torch.bool, device=src.device)
        for _ in range(max_len):
            q, h = self.decoder(self.tgt_embed(tok), h)
            logp = F.log_softmax(self._step_logits(q, enc, keys, mask)[:, 0].float(), -1)  # (B*beam, V)
            frozen = torch.full_like(logp, float("-inf"))
            frozen[:, PAD] = 0
            logp = torch.where(done[:, None], frozen, logp)
            total = (score.view(-1, 1) + logp).view(B, beam * V)
            score, idx = total.topk(beam, -1)                    # (B, beam)
            parent = (idx // V + torch.arange(B, device=src.device)[:, None] * beam).view(-1)
            tok = (idx % V).view(-1, 1)
            seqs = torch.cat([seqs[parent], tok], 1)
            h = h[:, parent]
            done = done[parent] | (tok[:, 0] == EOS)
            if done.all():
                break
        best = score.argmax(-1) + torch.arange(B, device=src.device) * beam
        return seqs[best]


def seq2seq_step(model: Seq2Seq, opt: torch.optim.Optimizer, src: Tensor, tgt_in: Tensor, labels: Tensor,
                 clip: Optional[float] = 1.0) -> Tensor:
    """One training step (forward, backward, gradient norm clipped at ``clip``, optimizer step) on a batch from
    encode_batch and targets."""
    loss = model.loss(src, tgt_in, labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return loss.detach()


def exact_match(model: Seq2Seq, sources: Sequence[str], answers: Sequence[str], beam: Optional[int] = None,
                chunk: int = 500) -> float:
    """The fraction of sources decoded (greedy, or beam search with ``beam`` hypotheses) to exactly the answer."""
    was = model.training
    model.eval()
    right = 0
    for i in range(0, len(sources), chunk):
        src = encode_batch(sources[i:i + chunk])
        ids = model.greedy(src) if beam is None else model.beam_search(src, beam)
        right += sum(decode(row) == a for row, a in zip(ids.tolist(), answers[i:i + chunk]))
    model.train(was)
    return right / len(sources)


__all__: Sequence[str] = ["Seq2Seq", "ATTENTIONS", "VOCAB", "CHARS", "PAD", "BOS", "EOS", "encode", "decode",
                          "encode_batch", "targets", "seq2seq_step", "exact_match"]
