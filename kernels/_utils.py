"""Helpers shared by the Triton launchers."""
import torch
import triton

# A row kernel keeps a whole row in registers up to this many bytes; wider rows loop over blocks of
# LOOP_BLOCK elements (small enough that a 16-warp program holds its working set without spilling).
MAX_FUSED_BYTES = 65536
LOOP_BLOCK = 4096


def row_block(n: int, element_size: int) -> tuple[int, bool]:
    """(BLOCK_N, SINGLE_BLOCK) for a row of n elements: the whole row in one block when it fits."""
    block = triton.next_power_of_2(max(n, 1))
    return (block, True) if block * element_size <= MAX_FUSED_BYTES else (LOOP_BLOCK, False)


def row_warps(block: int) -> int:
    return min(max(block // 256, 1), 16)


def num_programs(device: torch.device, rows: int, per_sm: int = 4) -> int:
    """Persistent-grid size for kernels that reduce across rows (dW): a few programs per SM."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter: a handful of programs exercises the same strided-row loop
        sms = 2
    return max(1, min(rows, sms * per_sm))
