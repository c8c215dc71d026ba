"""Hugging Face <-> megatron-core conversion of Llama-family models."""
