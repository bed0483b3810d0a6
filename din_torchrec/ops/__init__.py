"""Native CPU kernels built on first use (``torch.utils.cpp_extension``), each with a plain PyTorch reference
beside it in :mod:`din_torchrec.modules` and a fallback to it when no C++ compiler is at hand."""
