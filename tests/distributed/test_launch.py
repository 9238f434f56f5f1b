"""The backend and device a torchrun rank starts with (tritium.distributed.init_distributed, the command lines'
--device / --backend): NCCL on cuda:LOCAL_RANK when there is a GPU, gloo on the CPU, either overridable. There is
no GPU here, so torch.cuda is told there are two by monkeypatching, and init_process_group is recorded, not
called; the real gloo runs are the torchrun tests (tests/distributed/test_tensor_parallel.py, test_training.py)."""
from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist

from tritium.cli.errors import UsageError
from tritium.distributed import init_distributed, pick_backend

CPU = torch.device("cpu")


def _gpus(monkeypatch, n: int, local_rank: int = 0):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))


@pytest.fixture
def calls(monkeypatch):
    """The process-group calls, recorded in order instead of made."""
    seen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.append(("set_device", torch.device(d))))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: seen.append(("init", backend, timeout)))
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a: seen.append(("destroy",)))
    monkeypatch.setattr(dist, "get_rank", lambda *a: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    return seen


def test_pick_backend_with_a_gpu_per_rank(monkeypatch):
    _gpus(monkeypatch, 2, local_rank=1)
    gpu = torch.device("cuda", 1)
    assert pick_backend() == ("nccl", gpu)
    assert pick_backend("cuda") == ("nccl", gpu)
    assert pick_backend(backend="nccl") == ("nccl", gpu)
    assert pick_backend("cuda", "gloo") == ("gloo", gpu)     # gloo takes CUDA tensors too
    assert pick_backend(backend="gloo") == ("gloo", CPU)     # gloo alone keeps the CPU, as before
    assert pick_backend("cpu") == ("gloo", CPU)
    with pytest.raises(ValueError, match=r"backend nccl takes CUDA tensors only: it needs device cuda, got device "
                                         r"cpu"):
        pick_backend("cpu", "nccl")
    monkeypatch.setenv("LOCAL_RANK", "2")   # a third rank on a machine with two GPUs
    with pytest.raises(ValueError, match=r"this rank \(LOCAL_RANK 2\) takes GPU 2, but torch sees 2 CUDA device"):
        pick_backend()


def test_pick_backend_without_a_gpu(monkeypatch):
    _gpus(monkeypatch, 0)
    assert pick_backend() == ("gloo", CPU)
    assert pick_backend("cpu", "gloo") == ("gloo", CPU)
    for device, backend in (("cuda", None), (None, "nccl"), ("cuda", "nccl")):
        with pytest.raises(ValueError, match=r"torch sees 0 CUDA device\(s\) \(use device cpu and backend gloo\)"):
            pick_backend(device, backend)
    with pytest.raises(ValueError, match=r"device must be one of \('cpu', 'cuda'\).*got 'mps'"):
        pick_backend("mps")
    with pytest.raises(ValueError, match=r"backend must be one of \('gloo', 'nccl'\).*got 'mpi'"):
        pick_backend(backend="mpi")


def test_init_distributed_makes_the_rank_gpu_current_first(monkeypatch, calls):
    _gpus(monkeypatch, 2, local_rank=1)
    assert init_distributed(timeout_s=60) == torch.device("cuda", 1)
    assert calls == [("set_device", torch.device("cuda", 1)), ("init", "nccl", datetime.timedelta(seconds=60))]
    calls.clear()
    _gpus(monkeypatch, 0)
    assert init_distributed() == CPU
    assert calls == [("init", "gloo", datetime.timedelta(seconds=300))]


class _Loaded(Exception):
    """Raised by the stand-in loader: the command got as far as loading the model."""


def _stop_at_load(monkeypatch):
    """The device the command loads its model on (recorded; the load itself is not run)."""
    from tritium.cli import generate

    where = []

    def load_with_progress(*args, device="cpu", **kwargs):
        where.append(torch.device(device))
        raise _Loaded

    monkeypatch.setattr(generate, "load_with_progress", load_with_progress)
    return where


def _commands():
    """(name, main, argv) of every command that runs under torchrun (serve when its extra is installed)."""
    from tritium.cli import finetune, generate

    out = [("generate", generate.main, ["hi", "--tp", "2"]), ("finetune", finetune.main, ["--out", "unused"])]
    try:
        import fastapi  # noqa: F401

        from tritium.cli import serve
        out.append(("serve", serve.main, ["--tp", "2"]))
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("name", ["generate", "serve", "finetune"])
def test_commands_under_torchrun_start_on_the_rank_device(monkeypatch, calls, name):
    """generate --tp, serve --tp and finetune on 2 ranks: NCCL and cuda:LOCAL_RANK (made current before the group
    starts, the model loaded there) when there are GPUs; gloo and the CPU without; --backend / --device override;
    NCCL on the CPU is a usage error before any group starts. The group is destroyed when the command fails."""
    commands = {n: (main, argv) for n, main, argv in _commands()}
    if name not in commands:
        pytest.skip("tritium serve needs the serve extra (fastapi)")
    main, argv = commands[name]
    where = _stop_at_load(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    gpu = torch.device("cuda", 1)
    for gpus, flags, backend, device in ((2, [], "nccl", gpu), (0, [], "gloo", CPU),
                                         (2, ["--device", "cpu"], "gloo", CPU),
                                         (2, ["--backend", "gloo"], "gloo", CPU),
                                         (2, ["--device", "cuda", "--backend", "gloo"], "gloo", gpu)):
        _gpus(monkeypatch, gpus, local_rank=1)
        calls.clear()
        where.clear()
        with pytest.raises(_Loaded):
            main([*argv, *flags])
        timeout = datetime.timedelta(seconds=300)
        assert calls == [*([("set_device", gpu)] if device.type == "cuda" else []), ("init", backend, timeout),
                         ("destroy",)], (flags, calls)
        assert where == [device], (flags, where)
    calls.clear()
    with pytest.raises(UsageError, match=r"--device/--backend: backend nccl takes CUDA tensors only"):
        main([*argv, "--device", "cpu", "--backend", "nccl"])
    _gpus(monkeypatch, 0, local_rank=1)
    with pytest.raises(UsageError, match=r"--device/--backend: device cuda: .* torch sees 0 CUDA device"):
        main([*argv, "--device", "cuda"])
    assert calls == []


@pytest.mark.parametrize("name", ["generate", "serve", "finetune"])
def test_commands_in_one_process_take_device_but_no_backend(monkeypatch, calls, name):
    """Outside torchrun there is no group: --backend is a usage error, the model goes to the CPU unless --device
    cuda (cuda:0), which needs a GPU."""
    commands = {n: (main, [a for a in argv if a not in ("--tp", "2")]) for n, main, argv in _commands()}
    if name not in commands:
        pytest.skip("tritium serve needs the serve extra (fastapi)")
    main, argv = commands[name]
    where = _stop_at_load(monkeypatch)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for flags, device in (([], CPU), (["--device", "cuda"], torch.device("cuda", 0))):
        where.clear()
        with pytest.raises(_Loaded):
            main([*argv, *flags])
        assert where == [device], (flags, where)
    with pytest.raises(UsageError, match=r"--backend gloo picks the process group's backend under torchrun; one "
                                         r"process has no group"):
        main([*argv, "--backend", "gloo"])
    _gpus(monkeypatch, 0)
    with pytest.raises(UsageError, match=r"torch sees 0 CUDA device"):
        main([*argv, "--device", "cuda"])
    assert calls == []


def test_train_dist_refuses_nccl_on_the_cpu(calls, capsys):
    from tritium.cli import train_dist

    with pytest.raises(SystemExit) as e:
        train_dist.main(["--device", "cpu", "--backend", "nccl"])
    assert e.value.code == 2 and calls == []
    assert "backend nccl takes CUDA tensors only" in capsys.readouterr().err
