"""`tritium serve` and `tritium bench serve` on the command line: help, bad values as one-line usage errors (exit
status 2, before any model loads), and the model's API name."""
import pytest

from tritium.cli import main

pytest.importorskip("fastapi", reason="the serve extra: pip install 'tritium[serve]'")


@pytest.mark.parametrize("argv,message", [
    (["serve", "--port", "70000"], "--port: must be an integer in [0, 65535], got 70000"),
    (["serve", "--max-batch", "0"], "--max-batch: must be an integer >= 1, got 0"),
    (["serve", "--max-queue", "-1"], "--max-queue: must be an integer >= 0, got -1"),
    (["serve", "--weights", "int3"], "--weights: invalid choice: 'int3'"),
    (["serve", "--dtype", "half"], "--dtype: dtype must be one of"),
    (["serve", "--weights", "float", "--int8-activations"], "--int8-activations needs quantized"),
    (["bench", "serve", "--clients", "1,0"], "--clients: must be an integer >= 1, got 0"),
    (["bench", "serve", "--gen-len", "0"], "--gen-len: must be an integer >= 1, got 0"),
    (["bench", "serve", "--int8-act", "twice"], "--int8-act: invalid choice: 'twice'"),
])
def test_usage_errors(argv, message, capfd):
    assert main(argv) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tritium: error: {message}"), err


def test_missing_model_file(capfd):
    assert main(["serve", "--model", "no/such/model.gguf"]) == 1
    assert capfd.readouterr().err.strip() == "tritium: error: model file not found: no/such/model.gguf"


@pytest.mark.parametrize("argv", [["serve", "--help"], ["bench", "serve", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"usage: tritium {' '.join(argv[:-1])}")
    assert ("--shared-prefix" if argv[0] == "bench" else "--no-prefix-caching") in out


def test_served_name():
    from tritium.cli.serve import served_name

    assert served_name("/x/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct"
    assert served_name("/models/llama-3.2-1b-f16.gguf") == "llama-3.2-1b"
    assert served_name("/models/MyModel/") == "MyModel"
