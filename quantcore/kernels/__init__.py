"""Hand-written kernels for real low-bit execution (imported lazily: Triton is optional)."""
