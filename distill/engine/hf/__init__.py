"""Hugging Face modules as they are, run by `transformers` (tensor parallelism) for any causal LM."""
