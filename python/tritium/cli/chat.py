"""``tritium chat``: an interactive multi-turn chat with the embedded SmolLM2-135M-Instruct (or --model).

Type a message; /reset starts over, /system TEXT sets the system prompt, /exit (or Ctrl-D) quits."""
from __future__ import annotations

import sys
from typing import List, Optional

from .errors import ArgumentParser
from .generate import add_model_arguments, check_model_arguments, load_from_args, report, sampling_kwargs


def main(argv: Optional[List[str]] = None) -> int:
    p = ArgumentParser(prog="tritium chat", description=__doc__.splitlines()[0])
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--stats", action="store_true", help="print tok/s after each reply")
    add_model_arguments(p)
    p.set_defaults(max_new_tokens=256)
    args = p.parse_args(argv)
    check_model_arguments(args)

    from tritium.inference.engine import Engine

    console, model, tok = load_from_args(args)
    console.print(f"[dim]{model.load_note}[/dim]")
    engine = Engine(model, tok, max_batch=1)
    system = args.system
    messages: list = []
    console.print("[dim]chat with the model; /reset, /system TEXT, /exit[/dim]")
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            messages = []
            continue
        if cmd.startswith("/system"):
            system = cmd[len("/system"):].strip() or None
            messages = []
            continue
        messages.append({"role": "user", "content": line})
        convo = ([{"role": "system", "content": system}] if system else []) + messages
        prompt = tok.apply_chat_template(convo)
        sys.stdout.write("bot> ")

        def on_token(req, token, text):
            sys.stdout.write(text)
            sys.stdout.flush()

        res = engine.generate([prompt], max_new_tokens=args.max_new_tokens, on_token=on_token,
                              **sampling_kwargs(args))[0]
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": res.text})
        if args.stats:
            report(engine, model, console)


if __name__ == "__main__":
    from . import main as cli_main

    sys.exit(cli_main(["chat", *sys.argv[1:]]))
