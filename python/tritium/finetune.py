"""Supervised fine-tuning with LoRA on tritium ops: the library behind ``tritium finetune`` (docs/finetune.md).

Data: JSON Lines, one example per line, in either of TRL's two shapes:

- conversational, ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}``:
  rendered with the model's chat template; the loss is on the assistant turns only (their text and the
  template's end-of-turn after it), every other token is masked;
- prompt/completion, ``{"prompt": ..., "completion": ...}``: plain text, the loss on the completion and an EOS.

Training: ``tritium.lora.apply`` puts adapters on the chosen projections (the base frozen), the loss is
``tritium.fused_linear_cross_entropy`` on the final hidden states and the (frozen, tied) LM head, so no (tokens,
vocab) logits are held, and ``tritium.optim.AdamW`` steps the adapters (float32 master weights for bfloat16).
QLoRA (``qlora=True``, or ``base="nf4"``): the adapted projections' frozen weights are held in NF4 (bitsandbytes'
layout) and multiplied dequantised in the kernel; ``base="int8"`` or ``"int4"`` holds them as tritium's int8/int4
quantized weights (docs/quantization.md) instead. ``dequantize_bases`` turns them back into float weights to merge
and serve.

``dates_task`` generates the data set the command ships with: dates written out in words, to be rewritten as
ISO 8601 (``March 4, 2023`` -> ``2023-03-04``). Its answers are checkable, so ``exact_match`` measures what a
fine-tune changed: the embedded model gets a few percent of them right before, most of them after.
"""
from __future__ import annotations

import datetime
import json
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import tritium

IGNORE_INDEX = -100
# the Hugging Face names of a Llama layer's projections: what --targets chooses from (PEFT's target_modules)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
_DATE_FORMATS = (lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
                 lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
                 lambda d: f"{MONTHS[d.month - 1][:3]} {d.day} {d.year}",
                 lambda d: f"the {d.day}{_suffix(d.day)} of {MONTHS[d.month - 1]}, {d.year}")
_DATE_ASKS = ("Convert this date to YYYY-MM-DD: {}", "Write {} in ISO 8601 format.",
              "What is {} as YYYY-MM-DD?", "Rewrite the date {} as year-month-day (YYYY-MM-DD).")


def _suffix(day: int) -> str:
    return "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


def dates_task(n: int, seed: int = 0, split: str = "train") -> List[dict]:
    """n conversational examples of the date task ({"messages": [user, assistant]}). The splits draw from
    disjoint days (train: even days since 1900-01-01, test: odd), so a held-out date was never trained on."""
    if split not in ("train", "test"):
        raise ValueError(f"dates_task: split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{seed}-{split}")
    first, days = datetime.date(1900, 1, 1), (datetime.date(2099, 12, 31) - datetime.date(1900, 1, 1)).days
    out = []
    for _ in range(n):
        k = rng.randrange(days // 2) * 2 + (split == "test")
        d = first + datetime.timedelta(days=k)
        ask = rng.choice(_DATE_ASKS).format(rng.choice(_DATE_FORMATS)(d))
        out.append({"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": d.isoformat()}]})
    return out


def read_jsonl(path: str) -> List[dict]:
    """The examples of a JSON Lines file (blank lines skipped); a line that is not an example raises ValueError
    naming the file and line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from None
            try:
                check_example(ex)
            except ValueError as e:
                raise ValueError(f"{path}:{i}: {e}") from None
            out.append(ex)
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def check_example(ex) -> None:
    """ValueError unless ex is {"messages": [...]} with an assistant turn, or {"prompt": str, "completion": str}."""
    if isinstance(ex, dict) and "messages" in ex:
        msgs = ex["messages"]
        if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                        and isinstance(m.get("content"), str) for m in msgs)):
            raise ValueError("'messages' must be a non-empty list of {\"role\": str, \"content\": str}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError("'messages' has no assistant turn to learn")
    elif isinstance(ex, dict) and "prompt" in ex:
        if not (isinstance(ex["prompt"], str) and isinstance(ex.get("completion"), str)):
            raise ValueError("a prompt/completion example needs string 'prompt' and 'completion'")
    else:
        raise ValueError("an example is {\"messages\": [...]} or {\"prompt\": ..., \"completion\": ...}, got "
                         + (f"keys {sorted(ex)}" if isinstance(ex, dict) else type(ex).__name__))


def prompt_and_answer(ex: dict, tok) -> Tuple[str, str]:
    """The text to generate from and the expected answer: the chat template up to the last assistant turn and
    that turn's content (messages), or the prompt and the completion."""
    if "messages" in ex:
        msgs = ex["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return tok.apply_chat_template(msgs[:last], add_generation_prompt=True), msgs[last]["content"]
    return ex["prompt"], ex["completion"]


def encode(ex: dict, tok, max_len: int) -> Tuple[List[int], List[int]]:
    """(token ids, labels) of one example, labels IGNORE_INDEX where no loss is taken, cut to max_len tokens."""
    ids: List[int] = []
    labels: List[int] = []

    def put(text: str, learn: bool) -> None:
        t = tok.encode(text, add_bos=False) if text else []
        ids.extend(t)
        labels.extend(t if learn else [IGNORE_INDEX] * len(t))

    if "messages" in ex:
        msgs, done = ex["messages"], ""
        if tok.bos_id is not None and tok.add_bos:
            ids.append(tok.bos_id)
            labels.append(IGNORE_INDEX)
        for k, m in enumerate(msgs):
            if m["role"] == "assistant":
                head = tok.apply_chat_template(msgs[:k], add_generation_prompt=True)
                full = tok.apply_chat_template(msgs[:k + 1], add_generation_prompt=False)
                if not (head.startswith(done) and full.startswith(head)):
                    raise ValueError("the chat template does not render a conversation as a prefix of its "
                                     "continuation; use prompt/completion examples with this model")
                put(head[len(done):], False)
                put(full[len(head):], True)
                done = full
        if done:
            rest = tok.apply_chat_template(msgs, add_generation_prompt=False)[len(done):]
            put(rest, False)
    else:
        put(ex["prompt"], False)
        put(ex["completion"], True)
        if tok.eos_id is not None:
            ids.append(tok.eos_id)
            labels.append(tok.eos_id)
    return ids[:max_len], labels[:max_len]


def batches(encoded: Sequence[Tuple[List[int], List[int]]], batch_size: int, rng: random.Random,
            pad_id: int = 0) -> Iterator[Tuple[Tensor, Tensor]]:
    """One epoch of (ids, labels) batches, shuffled, right-padded (labels IGNORE_INDEX on the padding: with
    causal attention, padding after a sequence does not change it)."""
    order = list(range(len(encoded)))
    rng.shuffle(order)
    for s in range(0, len(order), batch_size):
        rows = [encoded[i] for i in order[s:s + batch_size]]
        n = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), n), pad_id, dtype=torch.int64)
        labels = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.int64)
        for j, (a, b) in enumerate(rows):
            ids[j, :len(a)] = torch.tensor(a)
            labels[j, :len(b)] = torch.tensor(b)
        yield ids, labels


def sft_loss(model, ids: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the labelled tokens: fused linear cross-entropy on the model's final
    hidden states and its LM head (no logits held)."""
    hidden = model.hidden_states(ids[:, :-1])
    return tritium.fused_linear_cross_entropy(hidden, model.lm_head.weight, labels[:, 1:],
                                              ignore_index=IGNORE_INDEX)


@dataclass
class FinetuneConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: Optional[List[str]] = None   # Hugging Face layer names (q_proj, ...); None: every projection
    epochs: float = 1.0
    lr: float = 1e-3
    batch_size: int = 16
    max_len: int = 512
    warmup: float = 0.05                  # fraction of the steps
    seed: int = 0
    qlora: bool = False                   # the adapted projections' frozen weights in NF4 (QLoRA): base="nf4"
    base: Optional[str] = None            # the adapted projections' frozen weights: None (float), nf4, int8, int4
    group_size: Optional[int] = None      # int4 / int8 groups (None: int4 32, int8 per channel)

    def quantize(self) -> Optional[str]:
        """The frozen base's kind (tritium.lora.apply's quantize): base, or "nf4" for qlora."""
        if self.qlora and self.base not in (None, "nf4"):
            raise ValueError(f"FinetuneConfig: qlora=True means base='nf4', got base={self.base!r}")
        return "nf4" if self.qlora else self.base


def prepare(fn: str, model, tok, examples: Sequence[dict], cfg: FinetuneConfig):
    """What a LoRA fine-tune sets up before its first step (finetune, tritium.distributed.finetune_ddp): the
    adapters (seeded; added with tritium.lora.apply unless the model has some), the encoded examples that have a
    token to learn within max_len, the number of steps, AdamW with master weights over the adapters and its
    warmup-cosine schedule. Returns (encoded, total, optimizer, scheduler)."""
    torch.manual_seed(cfg.seed)
    if not tritium.lora._adapters(model):
        tritium.lora.apply(model, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets,
                           quantize=cfg.quantize(), group_size=cfg.group_size)
    params = [p for p in model.parameters() if p.requires_grad]
    encoded = [encode(ex, tok, cfg.max_len) for ex in examples]
    encoded = [e for e in encoded if any(t != IGNORE_INDEX for t in e[1][1:])]
    if not encoded:
        raise ValueError(f"{fn}: no example has a token to learn within max_len")
    total = max(1, math.ceil(math.ceil(len(encoded) / cfg.batch_size) * cfg.epochs))
    return (encoded, total, *optimizer(params, cfg, total))


def optimizer(params: Sequence[torch.Tensor], cfg: FinetuneConfig, total: int):
    """The fine-tune's (optimizer, scheduler) over the adapters' params: AdamW with master weights and its
    warmup-cosine schedule over `total` steps."""
    opt = tritium.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, master_weights=True)
    return opt, tritium.optim.warmup_cosine(opt, total, max(1, int(total * cfg.warmup)))


def training_batches(encoded: list, tok, cfg: FinetuneConfig, total: int, device="cpu"):
    """(step, ids, labels) for steps 1..total: the batches of ``batches`` in one seeded order, epoch after
    epoch, on device (the model's)."""
    rng = random.Random(cfg.seed)
    pad = tok.eos_id if tok.eos_id is not None else 0
    step = 0
    while True:
        for ids, labels in batches(encoded, cfg.batch_size, rng, pad):
            step += 1
            yield step, ids.to(device), labels.to(device)
            if step >= total:
                return


def finetune(model, tok, examples: Sequence[dict], cfg: FinetuneConfig,
             on_step: Optional[Callable[[int, int, float, int, float], None]] = None) -> List[float]:
    """Train LoRA adapters on ``model`` (a tritium Llama with float weights; adapters added with tritium.lora.apply
    unless it has some) over the examples; on_step(step, total, loss, tokens, seconds) after each step. Returns
    the loss of every step. The adapters stay unmerged (tritium.lora.merge before serving)."""
    encoded, total, opt, sched = prepare("finetune", model, tok, examples, cfg)
    model.pack_for_inference(False)
    model.train()
    losses: List[float] = []
    for step, ids, labels in training_batches(encoded, tok, cfg, total, model.device):
        t0 = time.perf_counter()
        loss = sft_loss(model, ids, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, total, losses[-1], ids.numel(), time.perf_counter() - t0)
    model.eval()
    return losses


def dequantize_bases(model) -> None:
    """Quantized frozen bases (QLoRA's NF4, int8, int4) back to float weights (their dequantised values), so the
    adapters can be merged into them and the model served: a model's fused projections (hf_projections) and its
    LoRALinear layers."""
    for lin, _, _ in (model.hf_projections() if tritium.lora._fused(model) else ()):
        lin.dequantize_base()
    for m in tritium.lora.lora_modules(model).values():
        m.dequantize_base()


def exact_match(model, tok, examples: Sequence[dict], max_new_tokens: int = 24) -> Tuple[float, List[str]]:
    """(fraction of examples whose greedy answer, stripped, equals the expected one; the answers), on the serving
    path: a model with adapters must have them merged (tritium.lora.merge) first."""
    prompts, answers = zip(*(prompt_and_answer(ex, tok) for ex in examples))
    try:
        out = tritium.generate(model, tok, [tok.encode(p) for p in prompts], max_new_tokens=max_new_tokens)
    finally:
        model.pack_for_inference(False)   # the serving copies go: training reads the parameters
    got = [o.text.strip() for o in out]
    return sum(g == a.strip() for g, a in zip(got, answers)) / len(answers), got
