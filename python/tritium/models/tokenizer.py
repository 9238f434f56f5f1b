"""The tokenizer: a Hugging Face ``tokenizers`` byte-level BPE built from GGUF metadata (or a tokenizer.json).

GGUF stores the vocabulary (tokenizer.ggml.tokens), the merges ("a b" strings), the token types (3 = control,
4 = user defined: both become special added tokens), the BOS/EOS ids, whether to add BOS, the name of the
pre-tokenizer (tokenizer.ggml.pre) and the Jinja chat template. Byte-level BPE (tokenizer.ggml.model "gpt2")
is what Llama-3, SmolLM, Qwen, StarCoder ... use; the pre-tokenizer regex is chosen from the ``pre`` name.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

_CONTROL, _USER_DEFINED = 3, 4

# llama.cpp's pre-tokenizer names -> the tokenizers pre-tokenizer that reproduces it.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: Optional[str]):
    from tokenizers import Regex, pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "codeshell"):  # digits split one by one, then GPT-2's regex
        return pt.Sequence([pt.Digits(individual_digits=True), byte_level])
    if pre in ("llama-bpe", "llama3", "smaug-bpe", "dbrx", "falcon3"):
        return pt.Sequence([pt.Split(Regex(_LLAMA3_REGEX), behavior="isolated", invert=False),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre in (None, "default", "gpt2", "gpt-2"):
        return byte_level
    raise ValueError(f"GGUF tokenizer pre-tokenizer {pre!r} is not supported")


def _strings(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _ints(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# GGUF tokenizer metadata (after "tokenizer."): what each value must be, and the check
_GGUF_KEYS = {
    "ggml.tokens": ("a list of strings", _strings),
    "ggml.merges": ("a list of strings", _strings),
    "ggml.token_type": ("a list of integers", _ints),
    "ggml.pre": ("a string", lambda v: isinstance(v, str)),
    "ggml.bos_token_id": ("an integer", _int),
    "ggml.eos_token_id": ("an integer", _int),
    "ggml.add_bos_token": ("true or false", lambda v: isinstance(v, bool)),
    "chat_template": ("a string", lambda v: isinstance(v, str)),
}


def _check_gguf_metadata(meta: dict) -> None:
    """The tokenizer metadata's types and ids, before the tokenizers library sees them (its errors name
    nothing)."""
    if meta.get("ggml.model") != "gpt2":
        raise ValueError(f"only byte-level BPE GGUF tokenizers (tokenizer.ggml.model = 'gpt2') are supported, "
                         f"got {meta.get('ggml.model')!r}")
    if "ggml.tokens" not in meta:
        raise ValueError("metadata tokenizer.ggml.tokens is missing")
    for key, (want, ok) in _GGUF_KEYS.items():
        if key in meta and not ok(meta[key]):
            raise ValueError(f"metadata tokenizer.{key} must be {want}, got {type(meta[key]).__name__}")
    n = len(meta["ggml.tokens"])
    for key in ("ggml.bos_token_id", "ggml.eos_token_id"):
        if key in meta and not 0 <= meta[key] < n:
            raise ValueError(f"metadata tokenizer.{key} is {meta[key]}, not one of the {n} tokens")
    types = meta.get("ggml.token_type")
    if types and len(types) != n:
        raise ValueError(f"metadata tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")


def _tokenizer_from_gguf(meta: dict):
    from tokenizers import AddedToken, Tokenizer, decoders, models

    _check_gguf_metadata(meta)
    tokens: List[str] = list(meta["ggml.tokens"])
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("ggml.merges") or []]
    if any(len(m) != 2 for m in merges):
        raise ValueError("metadata tokenizer.ggml.merges has an entry without a space (merges are 'a b')")
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    except Exception as e:   # the tokenizers library raises plain Exception (e.g. a merge of an unknown token)
        raise ValueError(f"the tokenizer metadata does not make a BPE tokenizer: {e}") from None
    tok.pre_tokenizer = _pre_tokenizer(meta.get("ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    types = meta.get("ggml.token_type") or []
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)]
    tok.add_special_tokens(special)
    return tok


class Tokenizer:
    """encode(text) -> ids, decode(ids) -> text, apply_chat_template(messages) -> text.

    ``encode`` adds BOS only when the model's metadata asks for it (tokenizer.ggml.add_bos_token) and never
    splits the text of special tokens it contains (so a chat-formatted prompt encodes its markers as one id)."""

    def __init__(self, tok, bos_id: Optional[int], eos_id: Optional[int], add_bos: bool = False,
                 chat_template: Optional[str] = None, stop_ids: Sequence[int] = ()):
        self._tok = tok
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.chat_template = chat_template
        # Ids that end a generation: EOS plus the template's end-of-turn marker (ChatML: <|im_end|>).
        ids = [i for i in (eos_id, *stop_ids) if i is not None]
        self.stop_ids = sorted(set(ids))

    # ---- construction ----
    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> "Tokenizer":
        tok = _tokenizer_from_gguf(meta)
        eos = meta.get("ggml.eos_token_id")
        bos = meta.get("ggml.bos_token_id")
        stops = [tok.token_to_id(t) for t in ("<|im_end|>", "<|eot_id|>", "<|end|>")]
        return cls(tok, None if bos is None else int(bos), None if eos is None else int(eos),
                   bool(meta.get("ggml.add_bos_token", False)), meta.get("chat_template"),
                   [s for s in stops if s is not None])

    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer":
        """From tokenizer.json and tokenizer_config.json (optional) in the directory path; an error names the
        file (FileNotFoundError: no tokenizer.json; ValueError: one that does not parse)."""
        from tokenizers import Tokenizer as HFTokenizer

        name = os.path.join(os.path.basename(os.path.normpath(path)), "tokenizer.json")
        if not os.path.isfile(os.path.join(path, "tokenizer.json")):
            raise FileNotFoundError(f"{name}: not found (the tokenizer of a Hugging Face model directory)")
        try:
            tok = HFTokenizer.from_file(os.path.join(path, "tokenizer.json"))
        except Exception as e:   # the tokenizers library raises plain Exception
            raise ValueError(f"{name}: not a tokenizer the tokenizers library reads: {e}") from None
        tok.no_padding()
        tok.no_truncation()
        cfg: Dict = {}
        p = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(p):
            cfg_name = os.path.join(os.path.dirname(name), "tokenizer_config.json")
            try:
                with open(p, "rb") as f:
                    cfg = json.load(f)
            except ValueError as e:
                raise ValueError(f"{cfg_name}: not valid JSON: {e}") from None
            if not isinstance(cfg, dict) or not isinstance(cfg.get("chat_template") or "", str):
                raise ValueError(f"{cfg_name}: must be a JSON object whose chat_template (if any) is a string")

        def tid(key):
            v = cfg.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            return tok.token_to_id(v) if isinstance(v, str) else None

        stops = [tok.token_to_id(t) for t in ("<|im_end|>", "<|eot_id|>", "<|end|>")]
        # tokenizer.json's post-processor (if any) adds BOS itself; encode() below calls it with
        # add_special_tokens=self.add_bos, so honour the config's add_bos_token.
        return cls(tok, tid("bos_token"), tid("eos_token"), bool(cfg.get("add_bos_token", False)),
                   cfg.get("chat_template"), [s for s in stops if s is not None])

    # ---- use ----
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: Optional[bool] = None) -> List[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            if not ids or ids[0] != self.bos_id:
                ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self._tok.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(self, messages: List[Dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's prompt text: the model's own Jinja template if it has one,
        else ChatML (<|im_start|>role\\ncontent<|im_end|>\\n ...)."""
        if self.chat_template:
            import jinja2.sandbox

            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            tmpl = env.from_string(self.chat_template)
            bos = self.decode([self.bos_id]) if self.bos_id is not None else ""
            eos = self.decode([self.eos_id]) if self.eos_id is not None else ""
            return tmpl.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos, eos_token=eos)
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def load_tokenizer(tok_source) -> Tokenizer:
    """From GGUF tokenizer metadata (a dict) or a Hugging Face directory (a path)."""
    if isinstance(tok_source, dict):
        return Tokenizer.from_gguf_metadata(tok_source)
    return Tokenizer.from_dir(tok_source)
