"""What the pruned student is: its architecture, and which of the teacher's units it keeps.

The target shape is `student.arch`'s sizes (hidden size, layers, heads, key/value heads, FFN) on the
teacher's everything else (model family, vocabulary, head_dim, RoPE, norm epsilon, tied embeddings):
pruning removes units, it never changes what a unit is. Every check that can fail is made here, before
any rank starts, naming the key: a target larger than the teacher, heads per query group that the
teacher's groups cannot supply, a method that would change what it does not prune, a shape the student's
tp x pp cannot split.

Attention keeps whole query groups (a key/value head with its query heads) ranked by the sum of their
heads' scores, and inside each kept group the best-scoring query heads: G' of G groups, r' of r heads per
group, so any target with G' <= G and r' <= r stays a valid grouped-query layout. Indices are kept in the
teacher's order (kept heads group-major, as Hugging Face lays them out).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from distill.config import CampaignConfig
from distill.errors import DataError
from parallel.model import ModelArch


def pruned_arch(config: CampaignConfig, teacher: ModelArch) -> ModelArch:
    """The student `config.prune` makes from `teacher` (sizes from student.arch), checked."""
    assert config.student is not None and config.student.arch is not None and config.prune is not None
    target = config.student.arch
    if teacher.num_experts:
        raise DataError(
            f"teacher.path: a mixture-of-experts teacher ({teacher.model_type}) cannot be pruned into a dense "
            "student; prune a dense teacher"
        )
    if "model_type" in target.model_fields_set and target.model_type != teacher.model_type:
        raise DataError(
            f"student.arch.model_type is {target.model_type!r} but the teacher is {teacher.model_type!r}: a pruned "
            "student keeps its teacher's family (leave student.arch.model_type out)"
        )
    head_dim = target.head_dim or teacher.head_dim
    if head_dim != teacher.head_dim:
        raise DataError(
            f"student.arch.head_dim is {head_dim}, the teacher's is {teacher.head_dim}: pruning keeps or drops "
            "whole heads, so a pruned student keeps the teacher's head_dim (set student.arch.head_dim: "
            f"{teacher.head_dim})"
        )
    sizes = {
        "hidden_size": (target.hidden_size, teacher.hidden_size),
        "num_layers": (target.num_layers, teacher.num_layers),
        "num_attention_heads": (target.num_attention_heads, teacher.num_attention_heads),
        "num_key_value_heads": (
            target.num_key_value_heads or target.num_attention_heads,
            teacher.num_key_value_heads,
        ),
        "ffn_hidden_size": (target.ffn_hidden_size, teacher.ffn_hidden_size),
    }
    larger = [
        f"student.arch.{k} {mine} > the teacher's {theirs}"
        for k, (mine, theirs) in sizes.items()
        if mine > theirs
    ]
    if larger:
        raise DataError(
            "pruning only removes units; the target is larger than the teacher: " + "; ".join(larger)
        )
    method = config.prune.method
    width_keys = [k for k in sizes if k != "num_layers" and sizes[k][0] != sizes[k][1]]
    if method == "depth" and width_keys:
        raise DataError(
            f"prune.method depth drops whole layers and keeps the width, but student.arch changes "
            f"{', '.join(width_keys)}; use method width or both"
        )
    if method == "width" and sizes["num_layers"][0] != teacher.num_layers:
        raise DataError(
            f"prune.method width keeps every layer, but student.arch.num_layers is {target.num_layers} "
            f"(the teacher has {teacher.num_layers}); use method depth or both"
        )
    groups, heads = sizes["num_key_value_heads"][0], target.num_attention_heads
    per_group, teacher_per_group = heads // groups, teacher.num_attention_heads // teacher.num_key_value_heads
    if per_group > teacher_per_group:
        raise DataError(
            f"student.arch has {per_group} query heads per key/value head ({heads} / {groups}), the teacher "
            f"{teacher_per_group}: pruning keeps whole query groups and heads within them; keep at most "
            f"{teacher_per_group} heads per group"
        )
    arch = replace(
        teacher,
        hidden_size=target.hidden_size,
        num_layers=target.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=groups,
        ffn_hidden_size=target.ffn_hidden_size,
    )
    _check_student_layout(config, arch)
    return arch


def _check_student_layout(config: CampaignConfig, arch: ModelArch) -> None:
    tp, pp = config.parallel.tp, config.parallel.pp
    problems = [
        f"{name} {value} % parallel.{degree} {size} != 0"
        for name, value, degree, size in (
            ("attention heads", arch.num_attention_heads, "tp", tp),
            ("key/value heads", arch.num_key_value_heads, "tp", tp),
            ("FFN", arch.ffn_hidden_size, "tp", tp),
            ("layers", arch.num_layers, "pp", pp),
        )
        if value % size
    ]
    if problems:
        raise DataError("the pruned student does not split over the student's layout: " + "; ".join(problems))


@dataclass(frozen=True)
class KeptUnits:
    """The teacher's units the student keeps (global indices, increasing, except heads: group-major)."""

    layers: list[int]
    groups: list[list[int]]  # per kept layer: key/value heads
    heads: list[list[int]]  # per kept layer: query heads, those of each kept group together
    neurons: list[list[int]]  # per kept layer
    channels: list[int]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _top(scores: list[float], count: int) -> list[int]:
    """Indices of the `count` largest scores (ties: the lower index), in increasing order."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:count])


def choose_layers(teacher: ModelArch, target: ModelArch, metric: str, scores: dict[str, Any]) -> list[int]:
    """The layers kept: all, or all but the block (loss) or the layers (block importance) to drop."""
    drop = teacher.num_layers - target.num_layers
    if drop == 0:
        return list(range(teacher.num_layers))
    if metric == "block_importance":
        dropped = set(scores["depth_loss"]["block_importance"]["layers"])
    else:
        blocks = scores["depth_loss"]["blocks"]
        best = min(blocks, key=lambda k: (blocks[k], int(k.split("-")[0])))
        first, last = (int(x) for x in best.split("-"))
        dropped = set(range(first, last + 1))
    return [layer for layer in range(teacher.num_layers) if layer not in dropped]


def choose_units(
    teacher: ModelArch, target: ModelArch, method: str, metric: str, scores: dict[str, Any]
) -> KeptUnits:
    """Every kept index, from the importance `scores` (see `importance.py`)."""
    layers = (
        choose_layers(teacher, target, metric, scores)
        if method in ("depth", "both")
        else list(range(teacher.num_layers))
    )
    per_group = teacher.num_attention_heads // teacher.num_key_value_heads
    keep_per_group = target.num_attention_heads // target.num_key_value_heads
    groups, heads, neurons = [], [], []
    for layer in layers:
        head_scores = scores["heads"][layer]
        group_scores = [
            sum(head_scores[g * per_group : (g + 1) * per_group]) for g in range(teacher.num_key_value_heads)
        ]
        kept_groups = _top(group_scores, target.num_key_value_heads)
        groups.append(kept_groups)
        heads.append(
            [
                g * per_group + i
                for g in kept_groups
                for i in _top(head_scores[g * per_group : (g + 1) * per_group], keep_per_group)
            ]
        )
        neurons.append(_top(scores["neurons"][layer], target.ffn_hidden_size))
    channels = _top(scores["channels"], target.hidden_size)
    return KeptUnits(layers, groups, heads, neurons, channels)
