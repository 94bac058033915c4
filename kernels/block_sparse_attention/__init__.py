"""Block-sparse attention: naive reference, mask builders and the Triton kernels."""
