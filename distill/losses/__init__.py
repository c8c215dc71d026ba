"""Losses on vocabulary-sharded logits (`[.., V/tp]` per tensor-parallel rank)."""
