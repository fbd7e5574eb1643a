"""v4d.kernels: Triton kernels and torch references behind one ops interface (bottom layer)."""
