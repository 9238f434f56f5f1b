"""Triton kernels of tritium, one module per op family (installed as ``tritium.kernels``).

Each module holds its kernels, then its launchers. Launchers take torch tensors on any device Triton can
address: CUDA for real runs, CPU tensors under ``TRITON_INTERPRET=1`` for the tests.
"""
