"""din_torchrec: the Deep Interest Network family (DIN, DIEN, DSIN) on TorchRec."""

__version__ = "0.1.0"
