"""Model loading, input formatting and batched forward passes."""
