"""The one owner of the parallel degrees: tensor (tp), pipeline (pp) and data (dp) parallel sizes.

`dp` is never configured: it is what remains of the world size after tp x pp. Every check that
depends on the degrees lives here, so a bad layout fails once, up front, with a message that names
every factor involved (world size, tp, pp, and the model dimension that does not divide).
"""

from __future__ import annotations

from dataclasses import dataclass

from parallel.errors import ParallelConfigError


@dataclass(frozen=True)
class ParallelDims:
    tp: int
    pp: int
    dp: int
    ep: int = 1  # expert parallelism: each MoE layer's experts split over ep ranks carved out of dp

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @classmethod
    def from_world(cls, world_size: int, tp: int, pp: int, ep: int = 1) -> ParallelDims:
        """Derive dp from the world size; refuse layouts that do not tile it."""
        if tp < 1 or pp < 1 or ep < 1:
            raise ParallelConfigError(f"parallel.tp ({tp}), parallel.pp ({pp}) and ep ({ep}) must be >= 1")
        if world_size % (tp * pp):
            raise ParallelConfigError(
                f"world size {world_size} is not divisible by tp x pp = {tp} x {pp} = {tp * pp}; "
                f"launch a multiple of {tp * pp} processes or change parallel.tp / parallel.pp"
            )
        dp = world_size // (tp * pp)
        if dp % ep:
            raise ParallelConfigError(
                f"ep {ep} does not divide the data-parallel ranks: world size {world_size} / (tp {tp} x pp {pp}) "
                f"= dp {dp}; expert parallelism is carved out of data parallelism"
            )
        return cls(tp=tp, pp=pp, dp=dp, ep=ep)

    def check_model(
        self,
        *,
        num_layers: int,
        num_attention_heads: int,
        num_query_groups: int,
        vocab_size: int,
        num_experts: int = 0,
    ) -> None:
        """Refuse a model that cannot be split this way, naming each dimension that does not divide."""
        problems = []
        if num_attention_heads % self.tp:
            problems.append(f"attention heads {num_attention_heads} % tp {self.tp} != 0")
        if num_query_groups % self.tp:
            problems.append(f"key/value heads {num_query_groups} % tp {self.tp} != 0")
        if vocab_size % self.tp:
            problems.append(f"vocabulary {vocab_size} % tp {self.tp} != 0")
        if num_layers % self.pp:
            problems.append(f"layers {num_layers} % pp {self.pp} != 0")
        if num_experts and num_experts % self.ep:
            problems.append(f"experts {num_experts} % ep {self.ep} != 0")
        if self.ep > 1 and not num_experts:
            problems.append(f"ep {self.ep} on a dense model (no experts)")
        if problems:
            raise ParallelConfigError(
                f"the model does not split over tp={self.tp}, pp={self.pp}, ep={self.ep}: "
                + "; ".join(problems)
            )

    def global_batch_split(self, global_batch: int, micro_batch: int) -> int:
        """Number of micro-batches per DP rank per step; the global batch must tile dp x micro_batch."""
        if micro_batch < 1 or global_batch % (micro_batch * self.dp):
            raise ParallelConfigError(
                f"training.global_batch {global_batch} is not divisible by training.micro_batch {micro_batch} "
                f"x dp {self.dp} = {micro_batch * self.dp}"
            )
        return global_batch // (micro_batch * self.dp)

    def __str__(self) -> str:
        return f"tp{self.tp} pp{self.pp} dp{self.dp}" + (f" ep{self.ep}" if self.ep > 1 else "")
