"""Training tritium models under DDP and FSDP2 (torch.distributed.fsdp.fully_shard) on 2 gloo processes: 20
steps of tritium.optim.AdamW on a classic model (tritium ops: linear layers, activations, layer norms, attention,
cross-entropy), each rank on half of every global batch, give the same loss curve and parameters as one process
on the whole batches (DESIGN.md's tolerance rule: float32 against the one-process float64 run); so do a few
steps under torch.compile, and the LoRA fine-tune with DDP over the adapters (tritium.distributed.finetune_ddp)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

import tritium
from tests.distributed.spawn import spawn
from tests.util import assert_within_torch_error
from tritium import finetune as ft
from tritium.distributed import finetune_ddp
from tritium.models import LlamaConfig, build
from tritium.models.classic import MLP, TransformerEncoder

STEPS, BATCH = 20, 8
COMPILED_STEPS = 5


def _model(name):
    torch.manual_seed(0)
    if name == "mlp":
        return MLP(12, 24, 2, 5)
    m = TransformerEncoder(vocab_size=20, max_len=6, dim=16, depth=2, heads=2, num_classes=3, pre_norm=True)
    for block in m.blocks:
        # the key bias's exact gradient is zero (softmax ignores a shift shared by every key); Adam normalises the
        # rounding noise there into full-size steps, in float64 as in float32, so nothing can be compared on it
        block.attn.qkv.bias.requires_grad_(False)
    return m


def _batch(name, step):
    g = torch.Generator().manual_seed(100 + step)
    if name == "mlp":
        return torch.randn(BATCH, 12, generator=g), torch.randint(0, 5, (BATCH,), generator=g)
    return torch.randint(0, 20, (BATCH, 6), generator=g), torch.randint(0, 3, (BATCH,), generator=g)


def _train(model, name, rows=slice(None), dtype=torch.float32, after_loss=None, steps=STEPS):
    opt = tritium.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    losses = []
    for step in range(steps):
        x, y = _batch(name, step)
        x = x[rows].to(dtype) if x.is_floating_point() else x[rows]
        loss = tritium.cross_entropy(model(x), y[rows])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(after_loss(loss.detach()) if after_loss else loss.detach())
    return torch.stack(losses)


def _mean_over_ranks(loss):
    loss = loss.clone()
    dist.all_reduce(loss)
    return loss / dist.get_world_size()


def _check(rank, world, name, mode):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    single = _model(name)
    single64 = copy.deepcopy(single).double()
    model = copy.deepcopy(single)
    if mode == "ddp":
        wrapped = DDP(model)
    else:
        for layer in (model.layers if name == "mlp" else model.blocks):
            fully_shard(layer)
        wrapped = fully_shard(model)
    per = BATCH // world
    losses = _train(wrapped, name, slice(rank * per, (rank + 1) * per), after_loss=_mean_over_ranks)
    want = _train(single, name)
    want64 = _train(single64, name, dtype=torch.float64)
    what = f"{name} {mode} rank {rank}/{world}"
    assert_within_torch_error(losses, want, want64, what + " loss curve")
    params64 = dict(single64.named_parameters())
    for n, p in single.named_parameters():
        mine = dict(model.named_parameters())[n].detach()
        if mode == "fsdp":
            assert type(mine).__name__ == "DTensor", f"{what}: {n} is not sharded"
            mine = mine.full_tensor()
        assert_within_torch_error(mine, p.detach(), params64[n].detach(), f"{what} {n}")
    return "ok"


def _emulated_mixed_precision(model, name, world):
    """One process doing what FSDP2 with MixedPrecisionPolicy(bfloat16 params, float32 reduction) does on `world`
    ranks: every step, a bfloat16 copy of the float32 weights computes each rank's slice of the batch, the
    bfloat16 gradients are widened to float32 and averaged, and AdamW steps the float32 weights."""
    opt = tritium.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    per = BATCH // world
    losses = []
    for step in range(STEPS):
        x, y = _batch(name, step)
        grads, total = None, 0.0
        for r in range(world):
            work = copy.deepcopy(model).to(torch.bfloat16)
            rows = slice(r * per, (r + 1) * per)
            xr = x[rows].to(torch.bfloat16) if x.is_floating_point() else x[rows]
            loss = tritium.cross_entropy(work(xr), y[rows])
            loss.backward()
            g = [w.grad.float() for w in work.parameters() if w.requires_grad]
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
            total += loss.float().item()
        for p, g in zip([p for p in model.parameters() if p.requires_grad], grads):
            p.grad = g / world
        opt.step()
        opt.zero_grad()
        losses.append(torch.tensor(total / world))
    return torch.stack(losses)


def _check_mixed_precision(rank, world, name):
    """FSDP2 with bfloat16 compute and float32 reduction and master weights, activation checkpointing on every
    block: the same training as the one-process emulation, within the tolerance rule against float64."""
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    single = _model(name)
    single64 = copy.deepcopy(single).double()
    model = copy.deepcopy(single)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in (model.layers if name == "mlp" else model.blocks):
        checkpoint(layer)
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    per = BATCH // world
    losses = _train(model, name, slice(rank * per, (rank + 1) * per),
                    after_loss=lambda loss: _mean_over_ranks(loss.float()))
    want = _emulated_mixed_precision(single, name, world)
    want64 = _train(single64, name, dtype=torch.float64)
    what = f"{name} fsdp bf16 + checkpointing rank {rank}/{world}"
    assert_within_torch_error(losses, want.to(losses.dtype), want64, what + " loss curve",
                              compute_dtype=torch.bfloat16)
    params64 = dict(single64.named_parameters())
    for n, p in single.named_parameters():
        mine = dict(model.named_parameters())[n].detach().full_tensor()
        assert mine.dtype == torch.float32, f"{what}: {n} is {mine.dtype}"
        assert_within_torch_error(mine, p.detach(), params64[n].detach(), f"{what} {n}",
                                  compute_dtype=torch.bfloat16)
    return "ok"


def _check_all_mixed(rank, world):
    for name in ("mlp", "transformer"):
        _check_mixed_precision(rank, world, name)
    return "ok"


def test_fsdp_mixed_precision_and_checkpointing_match_emulation(tmp_path):
    results = spawn(tmp_path, 2, _check_all_mixed)
    assert results == ["'ok'"] * 2, "\n".join(results)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_distributed_training_matches_one_process(tmp_path, mode):
    results = spawn(tmp_path, 2, _check_all, mode)
    assert results == ["'ok'"] * 2, "\n".join(results)


def _emulated_ddp(model, name, world):
    """One process doing what DDP does on `world` ranks: each rank's slice of the batch forward and backward (under
    the caller's autocast), the gradients averaged, one AdamW step; the losses averaged over the slices."""
    opt = tritium.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    per = BATCH // world
    losses = []
    for step in range(STEPS):
        x, y = _batch(name, step)
        total = 0.0
        for r in range(world):
            rows = slice(r * per, (r + 1) * per)
            loss = tritium.cross_entropy(model(x[rows]), y[rows])
            (loss / world).backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(torch.tensor(total / world))
    return torch.stack(losses)


def _check_autocast_ddp(rank, world):
    """DDP under torch.autocast(cpu, bfloat16), the transformer encoder (linear layers, attention, layer norms,
    cross-entropy: each cast as torch casts its twin): the loss curve and parameters of one process doing each
    rank's slice under autocast and averaging the gradients, within the tolerance rule against float64; its
    products ran in bfloat16 and its loss in float32."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    name = "transformer"
    single = _model(name)
    single64 = copy.deepcopy(single).double()
    model = copy.deepcopy(single)
    seen = set()
    model.blocks[0].attn.qkv.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    per = BATCH // world
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _train(DDP(model), name, slice(rank * per, (rank + 1) * per), after_loss=_mean_over_ranks)
        want = _emulated_ddp(single, name, world)
    want64 = _train(single64, name, dtype=torch.float64)
    what = f"{name} ddp autocast rank {rank}/{world}"
    assert seen == {torch.bfloat16}, f"{what}: the qkv projection ran in {seen}"
    assert losses.dtype == torch.float32, f"{what}: the loss is {losses.dtype}"
    assert_within_torch_error(losses, want, want64, what + " loss curve", compute_dtype=torch.bfloat16)
    params64 = dict(single64.named_parameters())
    for n, p in single.named_parameters():
        mine = dict(model.named_parameters())[n].detach()
        assert mine.dtype == torch.float32, f"{what}: {n} is {mine.dtype}"
        assert_within_torch_error(mine, p.detach(), params64[n].detach(), f"{what} {n}",
                                  compute_dtype=torch.bfloat16)
    return "ok"


def test_ddp_under_autocast_matches_one_process(tmp_path):
    results = spawn(tmp_path, 2, _check_autocast_ddp)
    assert results == ["'ok'"] * 2, "\n".join(results)


def _check_all(rank, world, mode):
    for name in ("mlp", "transformer"):
        _check(rank, world, name, mode)
    return "ok"


def _compiled_matches_one_process(rank, world, name, backend_name, units, what, op_seen):
    """torch.compile with backend_name over the DDP-wrapped and over the fully_shard-ed model `name` (each module in
    its attribute `units` one FSDP2 unit): COMPILED_STEPS of AdamW give the one process's eager loss curve and
    parameters within the tolerance rule; op_seen(ops of every graph Dynamo captured) holds, and no graph break
    comes from tritium (what breaks a graph is DDP / FSDP2's own code)."""
    from torch._dynamo.backends.registry import lookup_backend
    from torch._inductor import config as inductor_config
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    seen = set()   # the ops of every graph Dynamo captured

    def backend(gm, inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return lookup_backend(backend_name)(gm, inputs)

    per = BATCH // world
    single = _model(name)
    want = _train(single, name, steps=COMPILED_STEPS)
    single64 = _model(name).double()
    want64 = _train(single64, name, dtype=torch.float64, steps=COMPILED_STEPS)
    for mode in ("ddp", "fsdp"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        seen.clear()
        model = _model(name)
        if mode == "ddp":
            wrapped = DDP(model)
        else:
            for unit in getattr(model, units):
                fully_shard(unit)
            wrapped = fully_shard(model)
        # one compile thread: two ranks share 2 cores, and a pool of Inductor's compile workers per rank costs more
        # to start than it saves (aot_eager compiles nothing)
        with inductor_config.patch(compile_threads=1):
            losses = _train(torch.compile(wrapped, backend=backend), name, slice(rank * per, (rank + 1) * per),
                            after_loss=_mean_over_ranks, steps=COMPILED_STEPS)
        label = f"{what} {name} {mode} rank {rank}/{world}"
        assert_within_torch_error(losses, want, want64, label + " loss curve")
        params64 = dict(single64.named_parameters())
        for n, p in single.named_parameters():
            mine = dict(model.named_parameters())[n].detach()
            mine = mine.full_tensor() if mode == "fsdp" else mine
            assert_within_torch_error(mine, p.detach(), params64[n].detach(), f"{label} {n}")
        assert op_seen(seen), (label, seen)
        breaks = dict(torch._dynamo.utils.counters["graph_break"])
        assert not any("tritium" in k for k in breaks), (label, breaks)
    return "ok"


def _check_compiled(rank, world):
    """The transformer encoder (tritium's attention op traced through its fake kernel) under aot_eager: Dynamo and
    AOTAutograd trace every step (what a graph break or a missing fake kernel would break) without Inductor's code
    generation, which takes minutes per rank on CI's 2 cores. (At these sizes the MLP's layers route to torch's own
    ops under Dynamo: no tritium op to trace.)"""
    return _compiled_matches_one_process(rank, world, "transformer", "aot_eager", "blocks", "compiled",
                                         lambda seen: any(t.startswith("tritium.") for t in seen))


def _check_inductor(rank, world):
    """The MLP under Inductor (the default backend: its generated code runs every step, forward and backward),
    tritium's relu op in the graph as an extern kernel. The MLP is the smallest classic model with a tritium op in
    its graph (its linear layers route to torch's at these sizes), which keeps Inductor's code generation short on
    CI's 2 cores (the encoder's takes several times longer)."""
    return _compiled_matches_one_process(rank, world, "mlp", "inductor", "layers", "inductor-compiled",
                                         lambda seen: "tritium.relu_fwd" in seen)


def test_inductor_compiled_ddp_and_fsdp_match_one_process(tmp_path):
    results = spawn(tmp_path, 2, _check_inductor, timeout_s=300)   # Inductor's code generation, shared cores
    assert results == ["'ok'"] * 2, "\n".join(results)


LORA_CFG = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64, vocab_size=257,
                  max_seq_len=256, tie_embeddings=True)
# 29 examples in batches of 7: the last batch has one row, so rank 1 has none of it
TUNE = ft.FinetuneConfig(r=4, alpha=8, epochs=1, lr=1e-2, batch_size=7, dropout=0.0, targets=["q_proj", "v_proj",
                                                                                                "down_proj"])


class ByteTok:
    """A byte tokenizer with a ChatML template, for tiny models (as tests/test_finetune.py's)."""
    bos_id, eos_id, add_bos = None, 256, False

    def encode(self, text, add_bos=None):
        return list(text.encode())

    def apply_chat_template(self, messages, add_generation_prompt=True):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _lora_model(dtype=torch.float32):
    return build(LORA_CFG, torch.float32).init_random(generator=torch.Generator().manual_seed(0)).to(dtype)


def _adapter_params(model):
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _check_lora(rank, world):
    """tritium.distributed.finetune_ddp (DDP over the adapters only) against tritium.finetune.finetune in one
    process on the same examples: the same loss curve and adapters, the frozen weights untouched, a last batch
    with fewer rows than ranks."""
    examples = ft.dates_task(29, 0)
    single, single64, model = _lora_model(), _lora_model(torch.float64), _lora_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    want = torch.tensor(ft.finetune(single, ByteTok(), examples, TUNE), dtype=torch.float32)
    want64 = torch.tensor(ft.finetune(single64, ByteTok(), examples, TUNE), dtype=torch.float64)
    got = torch.tensor(finetune_ddp(model, ByteTok(), examples, TUNE), dtype=torch.float32)
    what = f"LoRA DDP rank {rank}/{world}"
    assert len(got) == 5, got
    assert_within_torch_error(got, want, want64, what + " loss curve")
    mine, ref, ref64 = _adapter_params(model), _adapter_params(single), _adapter_params(single64)
    assert mine.keys() == ref.keys() and len(mine) == 2 * 3 * LORA_CFG.n_layers, sorted(mine)
    for n in ref:
        assert_within_torch_error(mine[n], ref[n], ref64[n], f"{what} {n}")
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), f"{what}: frozen {n} changed"
    return "ok"


def _check_lora_fsdp(rank, world):
    """tritium.distributed.finetune_fsdp (FSDP2: fully_shard per decoder block, the frozen base sharded too) against
    tritium.finetune.finetune in one process: the same loss curve and adapters; while training each block's frozen
    weights are sharded (this rank holds its rows only); afterwards the model holds its whole weights again, the
    frozen ones untouched, and serves (merged, the one process's greedy tokens)."""
    examples = ft.dates_task(29, 0)
    single, single64, model = _lora_model(), _lora_model(torch.float64), _lora_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    want = torch.tensor(ft.finetune(single, ByteTok(), examples, TUNE), dtype=torch.float32)
    want64 = torch.tensor(ft.finetune(single64, ByteTok(), examples, TUNE), dtype=torch.float64)
    shards = []

    def on_step(step, total, loss, tokens, seconds):
        w = model.layers[0].attention.wqkv.weight
        shards.append((type(w).__name__, tuple(w.to_local().shape) if hasattr(w, "to_local") else None))

    got = torch.tensor(tritium.distributed.finetune_fsdp(model, ByteTok(), examples, TUNE, on_step),
                       dtype=torch.float32)
    what = f"LoRA FSDP2 rank {rank}/{world}"
    rows = LORA_CFG.head_dim * (LORA_CFG.n_heads + 2 * LORA_CFG.n_kv_heads)
    assert shards == [("DTensor", (rows // world, LORA_CFG.dim))] * 5, (what, shards)
    assert len(got) == 5, got
    assert_within_torch_error(got, want, want64, what + " loss curve")
    mine, ref, ref64 = _adapter_params(model), _adapter_params(single), _adapter_params(single64)
    assert mine.keys() == ref.keys() and len(mine) == 2 * 3 * LORA_CFG.n_layers, sorted(mine)
    for n in ref:
        assert type(mine[n]).__name__ != "DTensor" and mine[n].shape == ref[n].shape, f"{what}: {n} still sharded"
        assert_within_torch_error(mine[n], ref[n], ref64[n], f"{what} {n}")
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), f"{what}: frozen {n} changed"
    # the whole model serves after training: merged, it decodes the one-process model's greedy tokens
    prompts = [list(b"<|im_start|>user\nMarch 4, 2023"), list(b"2023-01-05")]
    tokens = []
    for m in (model, single):
        tritium.lora.merge(m)
        tokens.append([r.token_ids for r in tritium.generate(m, None, prompts, max_new_tokens=6)])
    assert tokens[0] == tokens[1], (what, tokens)
    return "ok"


def _check_compiled_and_lora(rank, world):
    return _check_compiled(rank, world), _check_lora(rank, world)


def test_compiled_training_and_lora_ddp_match_one_process(tmp_path):
    """torch.compile under DDP and FSDP2, and the LoRA fine-tune on 2 ranks (one spawn: the processes' start-up
    is most of a small check's time)."""
    results = spawn(tmp_path, 2, _check_compiled_and_lora, timeout_s=240)   # Dynamo tracing, on shared cores
    assert results == ["('ok', 'ok')"] * 2, "\n".join(results)


def test_lora_fsdp_matches_one_process(tmp_path):
    results = spawn(tmp_path, 2, _check_lora_fsdp, timeout_s=240)   # three fine-tunes per rank, on shared cores
    assert results == ["'ok'"] * 2, "\n".join(results)


@pytest.mark.parametrize("shard,flags", [("ddp", []), ("fsdp", ["--compile", "--compile-backend", "aot_eager"])])
def test_torchrun_recipe(shard, flags):
    """docs/distributed.md's recipe, `torchrun --nproc-per-node 2 -m tritium.cli.train_dist`, runs and reports (FSDP2
    compiled: --compile)."""
    import os
    import re
    import subprocess
    import sys

    pytest.importorskip("sklearn", reason="the digits data set comes with scikit-learn (.[train])")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = subprocess.run([torchrun, "--nproc-per-node", "2", "-m", "tritium.cli.train_dist", "--model", "encoder",
                          "--shard", shard, "--epochs", "1", *flags], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    how = shard + (", compiled \\(aot_eager\\)" if flags else "")
    assert re.fullmatch(rf"encoder \({how}, 2 ranks, gloo\): 23 steps in [\d.]+ s, loss [\d.]+ \(mean of the last "
                        r"steps\), test accuracy [\d.]+", out.stdout.strip()), out.stdout


@pytest.mark.slow
def test_torchrun_lora_finetune(tmp_path):
    """docs/distributed.md's LoRA recipe, `torchrun --nproc-per-node 2 -m tritium finetune` (DDP, and FSDP2 with
    --shard fsdp), on the embedded model and a small data file: the same first and last loss and the same saved
    adapter as `tritium finetune` in one process (float32, within the tolerance rule against the one-process
    float64 run; no dropout)."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(ex) + "\n" for ex in ft.dates_task(12, 0)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    flags = ["finetune", "--data", str(data), "--batch-size", "6", "--max-len", "128", "--lora-r", "4",
             "--lora-dropout", "0", "--targets", "q_proj,v_proj"]
    runs = {}
    two = [torchrun, "--nproc-per-node", "2"]
    for name, launch, dtype, shard in (("one", [sys.executable], "float32", []),
                                       ("one64", [sys.executable], "float64", []),
                                       ("two", two, "float32", []), ("fsdp", two, "float32", ["--shard", "fsdp"])):
        out = subprocess.run([*launch, "-m", "tritium", *flags, *shard, "--dtype", dtype, "--out",
                              str(tmp_path / name), "--json", str(tmp_path / f"{name}.json")], capture_output=True,
                             text=True, env=env, timeout=600)
        assert out.returncode == 0, (name, out.stderr)
        runs[name] = (json.loads((tmp_path / f"{name}.json").read_text()),
                      load_file(str(tmp_path / name / "adapter_model.safetensors")))
    (one, a1), (one64, a64) = runs["one"], runs["one64"]
    for shard, name in (("ddp", "two"), ("fsdp", "fsdp")):
        two, a2 = runs[name]
        assert two["ranks"] == 2 and two["shard"] == shard and one["ranks"] == 1, (one, two)
        assert two["steps"] == one["steps"] == 2, (one, two)
        losses = [torch.tensor([r["first_loss"], r["last_loss"]], dtype=dt)
                  for r, dt in ((two, torch.float32), (one, torch.float32), (one64, torch.float64))]
        assert_within_torch_error(*losses, f"torchrun finetune ({shard}) losses")
        assert a2.keys() == a1.keys() and len(a1) == 4 * 30, sorted(a1)[:4]
        for n in a1:
            assert_within_torch_error(a2[n], a1[n], a64[n].double(), f"torchrun finetune ({shard}) adapter {n}")


def test_finetune_shard_fsdp_refuses_qlora(tmp_path):
    """--shard fsdp shards the frozen weights as parameters, which QLoRA holds in NF4: a usage error, before
    anything loads."""
    from tritium.cli import finetune
    from tritium.cli.errors import UsageError

    with pytest.raises(UsageError, match="--shard fsdp shards the frozen weights as parameters; --qlora"):
        finetune.main(["--shard", "fsdp", "--qlora", "--out", str(tmp_path / "adapter")])
