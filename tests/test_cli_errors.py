"""Bad command lines for every `tritium` command: each ends with exit status 2 (a usage error, found before any
model is loaded) or 1 (a failure while running: a missing or broken model file, a missing package) and exactly
one line on stderr, `tritium: error: ...`, with no traceback; --debug or TRITIUM_DEBUG=1 shows the traceback.

The table runs in this process through tritium.cli.main (the code path of the console script, with stderr
captured at the file descriptor); a few rows run the installed `tritium` script in a subprocess as well, for the
real process's exit status and output."""
import io
import os
import pathlib
import subprocess
import sys

import pytest

from tritium.cli import main

from .models.checkpoints import write_tiny_gguf

TRITIUM = str(pathlib.Path(sys.executable).with_name("tritium"))   # the console script pip installed


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """{name: path} of model files a user might pass by mistake."""
    d = tmp_path_factory.mktemp("broken")
    (d / "notes.gguf").write_text("hello, this is not a model file at all")
    data = open(write_tiny_gguf(d / "tiny.gguf"), "rb").read()
    (d / "cut.gguf").write_bytes(data[:len(data) // 2])
    (d / "empty-dir").mkdir()
    return {p.name: str(p) for p in d.iterdir()}


# (argv, exit status, the start of what follows "tritium: error: "); {name} stands for a file of `broken`
TABLE = [
    # generate: values
    (["generate", "hi", "--max-new-tokens", "-3"], 2, "--max-new-tokens: must be an integer >= 1, got -3"),
    (["generate", "hi", "--max-new-tokens", "ten"], 2, "--max-new-tokens: must be an integer >= 1, got 'ten'"),
    (["generate", "hi", "--max-new-tokens", "1.5"], 2, "--max-new-tokens: must be an integer"),
    (["generate", "hi", "--temperature", "-1"], 2, "--temperature: must be a number >= 0, got -1"),
    (["generate", "hi", "--temperature", "nan"], 2, "--temperature: must be a number >= 0, got nan"),
    (["generate", "hi", "--top-p", "0"], 2, "--top-p: must be a number in (0, 1], got 0"),
    (["generate", "hi", "--top-p", "1.5"], 2, "--top-p: must be a number in (0, 1]"),
    (["generate", "hi", "--top-k", "-1"], 2, "--top-k: must be an integer >= 0"),
    (["generate", "hi", "--min-p", "2"], 2, "--min-p: must be a number in [0, 1]"),
    (["generate", "hi", "--repetition-penalty", "0"], 2, "--repetition-penalty: must be a number > 0"),
    (["generate", "hi", "--seed", "-5"], 2, "--seed: must be an integer >= 0"),
    (["generate", "hi", "--threads", "0"], 2, "--threads: must be an integer >= 1"),
    (["generate", "hi", "--num-beams", "0"], 2, "--num-beams: must be an integer >= 1"),
    (["generate", "hi", "--dtype", "int8"], 2, "--dtype: dtype must be one of"),
    (["generate", "hi", "--weights", "q4"], 2, "--weights: invalid choice: 'q4'"),
    (["generate", "hi", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["generate", "hi", "--max-new-tokens"], 2, "--max-new-tokens: expected one argument"),
    (["generate"], 2, "the following arguments are required: prompt"),
    # generate: the prompt, conflicting flags
    (["generate", ""], 2, "the prompt is empty"),
    (["generate", "  \n"], 2, "the prompt is empty"),
    (["generate", "-"], 2, "the prompt is empty (stdin gave no text)"),
    (["generate", "hi", "--num-beams", "2", "--temperature", "0.7"], 2, "--num-beams > 1 searches"),
    (["generate", "hi", "--weights", "float", "--int8-activations"], 2, "--int8-activations needs quantized"),
    # generate: the model
    (["generate", "hi", "--model", "no/such/model.gguf"], 1, "model file not found: no/such/model.gguf"),
    (["generate", "hi", "--model", "{notes.gguf}"], 1, "notes.gguf: starts with b'hell', not the GGUF magic"),
    (["generate", "hi", "--model", "{cut.gguf}", "--weights", "float"], 1, "cut.gguf: tensor "),
    (["generate", "hi", "--model", "{cut.gguf}"], 1, "cut.gguf: tensor "),
    (["generate", "hi", "--model", "{empty-dir}"], 1, "empty-dir/config.json: not found"),
    # chat
    (["chat", "--top-p", "2"], 2, "--top-p: must be a number in (0, 1]"),
    (["chat", "--max-new-tokens", "0"], 2, "--max-new-tokens: must be an integer >= 1, got 0"),
    (["chat", "--dtype", "half"], 2, "--dtype: dtype must be one of"),
    (["chat", "hello"], 2, "unrecognized arguments: hello"),
    (["chat", "--weights", "float", "--int8-activations"], 2, "--int8-activations needs quantized"),
    (["chat", "--model", "no/such/model.gguf"], 1, "model file not found"),
    (["chat", "--model", "{cut.gguf}"], 1, "cut.gguf: tensor "),
    # train
    (["train"], 2, "the following arguments are required: --model"),
    (["train", "--model", "transformer"], 2, "--model: invalid choice: 'transformer'"),
    (["train", "--model", "mlp", "--epochs", "0"], 2, "--epochs: must be an integer >= 1, got 0"),
    (["train", "--model", "mlp", "--epochs", "x"], 2, "--epochs: must be an integer >= 1, got 'x'"),
    (["train", "--model", "mlp", "--seed", "-1"], 2, "--seed: must be an integer >= 0"),
    (["train", "--model", "mlp", "--impl", "jax"], 2, "--impl: invalid choice: 'jax'"),
    # info
    (["info", "--verbose"], 2, "unrecognized arguments: --verbose"),
    (["info", "extra"], 2, "unrecognized arguments: extra"),
    # bench (the values of a suite's own flags are the suite's to check, when it runs)
    (["bench", "--nope"], 2, "unrecognized arguments: --nope"),
    (["bench", "ops", "--mode", "sideways"], 2, "--mode: invalid choice: 'sideways'"),
    (["bench", "generate", "--repeats", "three"], 2, "--repeats: must be an integer >= 1, got 'three'"),
    (["bench", "generate", "--repeats", "-3"], 2, "--repeats: must be an integer >= 1, got -3"),
    (["bench", "generate", "--batches", "1,0"], 2, "--batches: must be an integer >= 1, got 0"),
    (["bench", "generate", "--weights", "int3"], 2, "--weights: takes float, native, int8, int4"),
    (["bench", "generate", "--int8-act", "maybe"], 2, "--int8-act: takes off, on, two-term, got 'maybe'"),
    (["bench", "generate", "--peer-variants", "Q9"], 2, "--peer-variants: takes file, Q4_0"),
    (["bench", "ops", "--shape", "64xq"], 2, "--shape: must be positive integers joined by x"),
    (["bench", "ops", "--min-time", "0"], 2, "--min-time: must be a number > 0, got 0"),
    (["bench", "models", "--rounds", "0"], 2, "--rounds: must be an integer >= 1, got 0"),
    (["bench", "memory", "--seqs", "1024,-1"], 2, "--seqs: must be an integer >= 1, got -1"),
    (["bench", "models", "--model", "nonesuch"], 2, "--model: invalid choice: 'nonesuch'"),
    (["bench", "memory", "--seqs"], 2, "--seqs: expected one argument"),
    # the command itself
    (["nonesuch"], 2, "unknown command 'nonesuch' (choose from bench, generate, chat, serve, train, finetune, info)"),
]


def _argv(argv, broken):
    return [broken[a[1:-1]] if a.startswith("{") else a for a in argv]


def _one_error_line(err: str, want: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("tritium: error: " + want), lines[0]
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv,status,want", TABLE, ids=[" ".join(t[0]) for t in TABLE])
def test_bad_command_line(argv, status, want, broken, capfd, monkeypatch):
    monkeypatch.delenv("TRITIUM_DEBUG", raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))     # `generate -` reads an empty stdin
    assert main(_argv(argv, broken)) == status
    out, err = capfd.readouterr()
    _one_error_line(err, want)
    assert not out.strip()


def test_missing_optional_package_names_the_extra(capfd, monkeypatch):
    monkeypatch.delenv("TRITIUM_DEBUG", raising=False)
    # `import sklearn` (and any of its modules an earlier test of this process imported) now raises
    for name in ["sklearn"] + [m for m in sys.modules if m.startswith("sklearn.")]:
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["train", "--model", "mlp", "--epochs", "1", "--no-progress"]) == 1
    line = _one_error_line(capfd.readouterr().err, "")
    assert "sklearn" in line and line.endswith("(pip install 'tritium[train]')"), line


def test_unexpected_exception_is_one_line_naming_its_type(capfd, monkeypatch):
    """A failure no user's mistake causes (a bug) is still one line, with its type and how to see more."""
    import tritium.cli.info as info

    def boom(argv):
        raise KeyError("oops")

    monkeypatch.delenv("TRITIUM_DEBUG", raising=False)
    monkeypatch.setattr(info, "main", boom)
    assert main(["info"]) == 1
    line = _one_error_line(capfd.readouterr().err, "KeyError: 'oops'")
    assert "--debug" in line
    monkeypatch.setenv("TRITIUM_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["info"])
    monkeypatch.delenv("TRITIUM_DEBUG")
    with pytest.raises(KeyError):
        main(["info", "--debug"])


# ---- the installed script, in a subprocess ---------------------------------------------------------------------
SUBPROCESS = [
    (["generate", "hi", "--max-new-tokens", "-3"], {}, 2, "--max-new-tokens: must be an integer >= 1, got -3"),
    (["generate", "hi", "--model", "{cut.gguf}"], {}, 1, "cut.gguf: tensor "),
    (["bench", "ops", "--mode", "sideways"], {}, 2, "--mode: invalid choice"),
    (["--debug", "generate", "hi", "--model", "{cut.gguf}"], {}, 1, None),
    (["chat", "--model", "{notes.gguf}"], {"TRITIUM_DEBUG": "1"}, 1, None),
]


@pytest.mark.parametrize("argv,env,status,want", SUBPROCESS, ids=[" ".join(t[0]) + " " + " ".join(t[1])
                                                                for t in SUBPROCESS])
def test_installed_script(argv, env, status, want, broken):
    """want None: a debug run, whose stderr ends in the traceback of the ValueError naming the file."""
    environ = {k: v for k, v in os.environ.items() if k != "TRITIUM_DEBUG"}
    r = subprocess.run([TRITIUM, *_argv(argv, broken)], capture_output=True, text=True, env={**environ, **env},
                       stdin=subprocess.DEVNULL, timeout=300)
    assert r.returncode == status, r.stderr
    if want is None:
        assert "Traceback (most recent call last)" in r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("ValueError: ") and ".gguf: " in r.stderr
    else:
        _one_error_line(r.stderr, want)
        assert not r.stdout.strip()
