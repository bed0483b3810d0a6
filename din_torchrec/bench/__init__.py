"""Benchmarks: embedding lookups, end-to-end training, fast paths vs references, peer comparison, GPU check.

Every benchmark writes JSON (and a PNG chart) and has a ``--small`` preset that runs in seconds for tests.
Heavy imports (TorchRec, FBGEMM) happen inside the functions that need them, so
:mod:`din_torchrec.bench.gpu_check` runs on a stock PyTorch install.
"""
