"""The DeepSpeed ZeRO engine: a Hugging Face causal LM as it is, sharded by ZeRO-1/2/3 over data parallel.

`engine.py` (the engine on the seam of `distill/engine/base.py`), `config.py` (the campaign config as
DeepSpeed's config dict), `checkpoint.py` (DeepSpeed's partitions plus the gathered HF model, atomic).
"""
