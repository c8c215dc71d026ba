"""Parallel degrees, process groups and megatron-core models; never imports `distill`."""
