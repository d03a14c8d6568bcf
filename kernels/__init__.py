"""Triton kernels of selfreplay-fast, installed as ``selfreplay_fast.kernels``."""
