"""tritium.models.seq2seq (issue 26): the GRU encoder-decoder with Luong or Bahdanau attention on tritium ops against
its plain-PyTorch twin (same state_dict, same logits and parameter gradients in float32), the character codec, pad
masking, greedy decoding against the teacher-forced logits, beam search against exhaustive search, and a short
date-conversion run."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from tritium.models.seq2seq import (BOS, EOS, PAD, Seq2Seq, decode, encode, encode_batch, exact_match,
                                    seq2seq_step, targets)
from tests.models.test_zoo import _assert_grads, _pair


def _small(impl, vocab=None, attention="luong"):
    kw = {} if vocab is None else {"vocab": vocab}
    return Seq2Seq(embed=12, hidden=16, impl=impl, attention=attention, **kw)


def test_codec():
    assert decode(encode("March 4, 2023") + [EOS, 5, 6]) == "March 4, 2023"
    src = encode_batch(["ab", "abcd"])
    assert src.tolist()[0][2:] == [PAD, PAD] and src.shape == (2, 4)
    assert encode_batch(["ab", "abcd"], left=True).tolist()[0][:2] == [PAD, PAD]
    inp, lab = targets(["12", "1"])
    assert inp.tolist() == [[BOS] + encode("12"), [BOS] + encode("1") + [PAD]]
    assert lab.tolist() == [encode("12") + [EOS], encode("1") + [EOS, -100]]
    with pytest.raises(ValueError, match=r"outside the vocabulary: \['#', 'é'\]"):
        encode("#é")


@pytest.mark.parametrize("attention", ["luong", "bahdanau"])
def test_seq2seq_twin_logits_loss_and_grads(attention):
    ours, twin = _pair(lambda impl: _small(impl, attention=attention))
    src = encode_batch(["March 4, 2023", "4 Mar 1999", "the 21st of June, 2001"])
    tgt_in, labels = targets(["2023-03-04", "1999-03-04", "2001-06-21"])
    la, lb = ours(src, tgt_in), twin(src, tgt_in)
    assert la.shape == (3, 11, ours.out.out_features)
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-5)
    ls_a, ls_b = ours.loss(src, tgt_in, labels), twin.loss(src, tgt_in, labels)
    torch.testing.assert_close(ls_a, ls_b, rtol=1e-5, atol=1e-6)
    ls_a.backward()
    ls_b.backward()
    _assert_grads(ours, twin)
    assert ours.src_embed.weight.grad[PAD].abs().sum() == 0  # padding_idx


@pytest.mark.parametrize("attention", ["luong", "bahdanau"])
def test_padding_is_masked(attention):
    """A source gives the same logits alone and padded in a batch with a longer one."""
    torch.manual_seed(0)
    model = _small("tritium", attention=attention).eval()
    tgt_in, _ = targets(["2023-03-04"])
    alone = model(encode_batch(["4 Mar 2023"]), tgt_in)
    padded = model(encode_batch(["4 Mar 2023", "the 4th of March, 2023"]), tgt_in.repeat(2, 1))[:1]
    torch.testing.assert_close(alone, padded, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl,attention", [("tritium", "luong"), ("torch", "luong"), ("tritium", "bahdanau")])
def test_greedy_follows_the_teacher_forced_argmax(impl, attention):
    """Greedy decoding step by step equals feeding its own output back through the teacher-forced forward."""
    torch.manual_seed(1)
    model = _small(impl, attention=attention).eval()
    src = encode_batch(["Jan 1 2000", "the 3rd of May, 1950"])
    ids = model.greedy(src, max_len=6)
    assert ids.shape == (2, 6)
    tgt_in = torch.cat([torch.full((2, 1), BOS), ids[:, :-1]], 1)
    with torch.no_grad():
        want = model(src, tgt_in).argmax(-1)
    for row, w in zip(ids.tolist(), want.tolist()):
        n = row.index(EOS) + 1 if EOS in row else len(row)
        assert row[:n] == w[:n]


def test_beam_search_is_exhaustive_on_a_tiny_vocabulary():
    """With a vocabulary of 5 (pad, bos, eos, two symbols), 3 steps and a beam of every hypothesis (up to 5^2),
    beam search returns the sequence of highest total log-probability over all sequences (EOS ends one)."""
    torch.manual_seed(2)
    model = Seq2Seq(embed=6, hidden=8, vocab=5).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    src = torch.tensor([[3, 4, 3], [4, 4, 3]])
    best = model.beam_search(src, beam=25, max_len=3)

    def score(b, seq):
        tgt_in = torch.tensor([[BOS] + list(seq[:-1])])
        with torch.no_grad():
            logp = F.log_softmax(model(src[b:b + 1], tgt_in)[0], -1)
        return sum(logp[i, s].item() for i, s in enumerate(seq))

    for b in range(2):
        cands = [c for n in (1, 2, 3) for c in itertools.product(range(5), repeat=n)
                 if (c[-1] == EOS or n == 3) and EOS not in c[:-1]]
        want = max(cands, key=lambda c: score(b, c))
        got = [t for t in best[b].tolist()]
        got = got[:got.index(EOS) + 1] if EOS in got else got
        assert tuple(got) == want, (b, got, want)
    # a beam of 1 is greedy
    torch.testing.assert_close(model.beam_search(src, beam=1, max_len=3), model.greedy(src, max_len=3))


def test_short_training_run():
    """60 steps on a fixed set of 64 dates lower the loss and decode some of them exactly."""
    from tritium.cli.train_gen import date_pairs

    pairs = date_pairs(64, seed=0)
    src = encode_batch([p[0] for p in pairs])
    tgt_in, labels = targets([p[1] for p in pairs])
    torch.manual_seed(0)
    model = Seq2Seq(embed=32, hidden=64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = seq2seq_step(model, opt, src, tgt_in, labels).item()
    for _ in range(120):
        last = seq2seq_step(model, opt, src, tgt_in, labels).item()
    assert last < 0.2 * first, (first, last)
    assert exact_match(model, [p[0] for p in pairs], [p[1] for p in pairs]) > 0.5


def test_date_pairs_splits_are_disjoint():
    from tritium.cli.train_gen import date_pairs

    train = {a for _, a in date_pairs(3000, split="train")}
    test = {a for _, a in date_pairs(3000, split="test")}
    assert not train & test and len(train) > 2500
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        date_pairs(1, split="dev")


def test_bahdanau_scores_by_hand():
    """The additive attention's context is softmax(v . tanh(W_a h_s + U_a q_t)) over the real positions, written
    out here with explicit loops' worth of broadcasting in float64."""
    torch.manual_seed(3)
    model = _small("tritium", attention="bahdanau").double().eval()
    src = encode_batch(["4 Mar 2023", "the 4th of March, 2023"])
    tgt_in, _ = targets(["2023-03-04", "2023-03-04"])
    with torch.no_grad():
        enc, keys, mask, h0 = model.encode(src)
        q, _ = model.decoder(model.tgt_embed(tgt_in), h0)
        wk = enc @ model.attn.weight.T                                                    # (B, S, H)
        uq = q @ model.attn_query.weight.T + model.attn_query.bias                       # (B, T, H)
        e = torch.einsum("btsh,h->bts", torch.tanh(wk[:, None] + uq[:, :, None]), model.attn_v.weight[0])
        real = (src != PAD)[:, None]
        a = torch.where(real, e, float("-inf")).softmax(-1)
        ctx = a @ enc
        want = model.out(torch.tanh(model.combine(torch.cat([ctx, q], -1))))
        torch.testing.assert_close(model._step_logits(q, enc, keys, mask), want)


def test_bad_attention():
    with pytest.raises(ValueError, match="attention must be one of \\('luong', 'bahdanau'\\), got 'dot'"):
        Seq2Seq(attention="dot")
