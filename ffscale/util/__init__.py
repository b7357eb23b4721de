"""Leaves that every layer may use: atomic writes, seeds, the host environment of CPU ranks,
FLOPs and peaks, safetensors weights, the top-k counter, a progress bar."""
