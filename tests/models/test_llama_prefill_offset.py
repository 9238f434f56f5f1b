"""A serving prefill that starts at a position > 0 (StepInput.prefill_slots: the prompt's first tokens' K/V are
already in the paged pools, as the prefix cache leaves them) equals prefilling the whole prompt from position 0:
the chunk's logits and the K/V it writes, float32 and bfloat16, starting at a block boundary and inside a block,
chunks of one token and of many, alone and packed with a decode row and a prefill from position 0."""
import pytest
import torch

from tritium.models.llama import StepInput

from .test_llama import tiny_model

BS = 4
N = 13   # prompt tokens


def _pools(model):
    c = model.config
    shape = (40, BS, c.n_kv_heads, c.head_dim)
    return [(torch.zeros(shape, dtype=model.dtype), torch.zeros(shape, dtype=model.dtype))
            for _ in range(c.n_layers)]


def _slots(blocks, positions):
    return torch.tensor([blocks[p // BS] * BS + p % BS for p in positions], dtype=torch.int64)


BLOCKS = [17, 3, 30, 8]   # scattered, as the cache hands them out


def _prefill(model, pools, prompt, start, ctx=True):
    """Prefill prompt[start:] at positions [start, len(prompt)) (continuing from the pools when start > 0);
    returns every chunk row's logits."""
    n = len(prompt)
    step = StepInput(torch.tensor(prompt[start:]), torch.arange(start, n), _slots(BLOCKS, range(start, n)), 0,
                     None, None, [n - start], logits_rows=torch.arange(n - start),
                     prefill_slots=[_slots(BLOCKS, range(n)) if start else None])
    return model.forward_step(step, pools)


def _written(pools, n):
    """The K/V of positions [0, n) read back from the pools: (layers, 2, n, kv_heads, head_dim)."""
    s = _slots(BLOCKS, range(n))
    return torch.stack([torch.stack([p.view(-1, *p.shape[2:])[s] for p in pair]) for pair in pools])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["tiny", "tiny-partial-rotary"])
@pytest.mark.parametrize("start", [4, 7, 12, 1], ids=["block-boundary", "mid-block", "chunk-of-1", "start-1"])
def test_prefill_from_start_equals_prefill_from_zero(name, dtype, start):
    model = tiny_model(name, dtype)
    prompt = torch.randint(0, model.config.vocab_size, (N,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        ref_pools = _pools(model)
        want = _prefill(model, ref_pools, prompt, 0)[start:].float()
        pools = _pools(model)
        _prefill(model, pools, prompt[:start], 0)                 # what the prefix cache would hold
        got = _prefill(model, pools, prompt, start).float()
        assert got.shape == want.shape
        kv_want, kv_got = _written(ref_pools, N).float(), _written(pools, N).float()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kv_got, kv_want, rtol=1e-5, atol=1e-5)
    else:   # bfloat16: the prefix rows go through the projections in a different row count (another blocking)
        assert (got - want).abs().max().item() <= 0.02 * want.abs().max().item()
        assert (kv_got - kv_want).abs().max().item() <= 0.02 * kv_want.abs().max().item()
    # the continuation really reads the cached prefix: with those pools zeroed its logits change
    with torch.no_grad():
        blank = _pools(model)
        wrong = _prefill(model, blank, prompt, start).float()
    assert (wrong - want).abs().max().item() > 0.1 * want.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mixed_step_with_decode_and_prefills(dtype):
    """One packed step as the engine builds it: a decode row, a prefill from position 0 and two continuing
    prefills (last_logits_only): each row's logits equal the full forward's last-token logits."""
    model = tiny_model("tiny", dtype)
    v = model.config.vocab_size
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, v, (n,), generator=g).tolist() for n in (10, 6, 11, 9)]
    starts = [None, 0, 8, 3]     # decode; from 0; continuing at a block boundary; inside a block
    blocks = [[10 * i + j for j in (3, 1, 2, 0)] for i in range(len(seqs))]
    pools = _pools(model)

    def slots(i, positions):
        return torch.tensor([blocks[i][p // BS] * BS + p % BS for p in positions], dtype=torch.int64)

    with torch.no_grad():
        for i, s in enumerate(seqs):   # what is cached before the step
            n = len(s) - 1 if starts[i] is None else starts[i]
            if n:
                model.forward_step(StepInput(torch.tensor(s[:n]), torch.arange(n), slots(i, range(n)), 0, None,
                                             None, [n], last_logits_only=True), pools)
        d = seqs[0]
        toks, pos, sl, lens, ctx = [d[-1]], [len(d) - 1], [slots(0, [len(d) - 1])], [], []
        for i in range(1, len(seqs)):
            s, st = seqs[i], starts[i]
            toks += s[st:]
            pos += range(st, len(s))
            sl.append(slots(i, range(st, len(s))))
            lens.append(len(s) - st)
            ctx.append(slots(i, range(len(s))) if st else None)
        step = StepInput(torch.tensor(toks), torch.tensor(pos), torch.cat(sl), 1,
                         torch.tensor([blocks[0]], dtype=torch.int32), torch.tensor([len(d)], dtype=torch.int32),
                         lens, last_logits_only=True, prefill_slots=ctx)
        out = model.forward_step(step, pools).float()
        assert out.shape[0] == len(seqs)
        for i, s in enumerate(seqs):
            want = model(torch.tensor([s]))[0, -1].float()
            if dtype == torch.float32:
                torch.testing.assert_close(out[i], want, rtol=1e-5, atol=1e-5)
            else:
                assert (out[i] - want).abs().max().item() <= 0.02 * want.abs().max().item()
