"""The megatron-core engine: the student (and a frozen teacher) as GPTModels under TP x PP x DP.

`engine.py` (the engine on the seam of `distill/engine/base.py`), `optimizer.py` (our AdamW with fp32
masters and the model-parallel grad norm), `distributed_optimizer.py` (megatron-core's, on CUDA),
`checkpoint.py` (sharded save and load at any layout), `weights.py` (HF or checkpoint weights into a
rank's shard; the teacher), `convert.py` (import to and export from HF directories).
"""
