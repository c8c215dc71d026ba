"""The vocabulary-sharded fused losses at tp=2 against dense single-process references, in one launch.

argv: OUT_DIR. Both ranks (gloo, a `new_group([0, 1])` as the tensor-parallel group) build the same
seeded full tensors (generated in float64, cast to float32), keep their vocabulary slice of the
student's output weight `[V, h] -> [V/2, h]` (and of the live teacher's), and run `fused_output_loss`
on `VocabShard.of(V, rank, 2, group)` with `chunk_tokens` not dividing the token count. Each case is
compared to the dense references of tests/loss_reference.py, evaluated locally in float64 on the full
vocabulary from the same float32 values:

- the loss per token (sum / N) and every unweighted per-term sum per token,
- the gradient with respect to the (full, replicated) hidden states,
- the gradient with respect to this rank's weight slice (the reference's gradient, sliced),
- the value under `torch.no_grad` (the path without gradients) against the value with them.

Cases: ce and every divergence against a live teacher at T = 1 and T = 2, a mixed weighting, top-k +
tail with k < V (true top-k ids, and ids chosen so that some rows sit on one shard only) and k = V
(against the dense forward KL), RS-KD draws with padding, TAID and JSD on the top-k completion
(also with a teacher vocabulary smaller than the student's), and everything at once on a top-k
teacher. Each rank reports the max abs errors per case, plus how the ids fall on the shards.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from distill.losses.fused import Terms, fused_output_loss
from distill.losses.projection import VocabProjection
from distill.losses.signal import (
    AlignedSignal,
    CachedTop,
    LiveSignal,
    LiveTop,
    SampledSignal,
    SpanTargets,
    TeacherSignal,
    TopKSignal,
)
from distill.losses.uld import VocabMatch
from parallel.vocab import VocabShard
from tests import loss_reference as ref
from tests.distributed import report

SEED = 20240611
V, TEACHER_VOCAB, H, H_TEACHER, N, K, DRAWS = 48, 40, 16, 12, 30, 10, 8
CHUNK = 7  # does not divide N
TP = 2
SKEW, BETA, TAU = 0.25, 0.3, 0.4  # not the defaults, so a parameter that is not passed on shows
KD_TERMS = ("forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd", "taid")

Reference = Callable[[torch.Tensor], torch.Tensor]  # dense student logits [N, V] (float64) -> [N]


@dataclass
class Data:
    hidden: torch.Tensor  # [N, H] float32
    weight: torch.Tensor  # [V, H]
    labels: torch.Tensor  # [N]
    teacher_hidden: torch.Tensor  # [N, H_TEACHER]
    teacher_weight: torch.Tensor  # [V, H_TEACHER]

    @property
    def teacher_logits(self) -> torch.Tensor:  # [N, V] float64
        return self.teacher_hidden.double() @ self.teacher_weight.double().t()


@dataclass
class Case:
    terms: Terms
    teacher: Callable[[slice], TeacherSignal | None]  # this rank's vocabulary slice -> the teacher signal
    refs: dict[str, Reference]  # unweighted per-token reference of every term in terms.weights
    tau: float = TAU  # TAID's interpolation parameter


def make_data(seed: int = SEED) -> Data:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).float()

    return Data(
        hidden=randn(N, H),
        weight=randn(V, H, scale=0.5),
        labels=torch.randint(0, V, (N,), generator=gen),
        teacher_hidden=randn(N, H_TEACHER),
        teacher_weight=randn(V, H_TEACHER, scale=0.6),
    )


def topk_signal(
    teacher_logits: torch.Tensor,
    k: int,
    *,
    teacher_vocab: int = V,
    temperature: float = 1.0,
    ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a top-k cache holds: ids `[N, k]` (the k largest, unless given), their log-probs over the
    teacher's vocabulary at `temperature` and the tail mass; float32 values."""
    logprobs = F.log_softmax(teacher_logits[:, :teacher_vocab].double() / temperature, -1)
    if ids is None:
        ids = logprobs.topk(k, -1).indices
    kept = logprobs.gather(-1, ids)
    if k == teacher_vocab:
        tail = torch.zeros(ids.shape[0], dtype=torch.float64)
    else:
        tail = (1 - kept.exp().sum(-1)).clamp_min(0)
    return ids, kept.float(), tail.float()


def one_shard_ids(gen: torch.Generator, k: int) -> torch.Tensor:
    """Distinct ids per row: rows 0, 3, ... only on shard 0, rows 1, 4, ... only on shard 1, others anywhere."""
    half = V // TP
    rows = []
    for i in range(N):
        low, high = [(0, half), (half, V), (0, V)][i % 3]
        rows.append(low + torch.randperm(high - low, generator=gen)[:k])
    return torch.stack(rows)


def sampled_signal(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """RS-KD draws: distinct ids per row, the last `i % 4` slots padding (-1, weight 0), weights count / n."""
    ids = torch.stack([torch.randperm(V, generator=gen)[:DRAWS] for _ in range(N)])
    counts = torch.randint(1, 5, (N, DRAWS), generator=gen).double()
    for i in range(N):
        pad = i % 4
        if pad:
            ids[i, -pad:] = -1
            counts[i, -pad:] = 0
    return ids, (counts / counts.sum(-1, keepdim=True)).float()


def terms(weights: dict[str, float], temperature: float = 1.0) -> Terms:
    return Terms(weights=weights, temperature=temperature, skew_alpha=SKEW, jsd_beta=BETA, chunk_tokens=CHUNK)


def dense_ref(name: str, teacher_logits: torch.Tensor, temperature: float, tau: float = TAU) -> Reference:
    def fn(zs: torch.Tensor) -> torch.Tensor:
        return ref.divergence(
            name, zs, teacher_logits.double(), temperature=temperature, skew=SKEW, beta=BETA, tau=tau
        )

    return fn


def build_cases(data: Data) -> dict[str, Case]:
    gen = torch.Generator().manual_seed(SEED + 1)
    zt = data.teacher_logits
    labels = data.labels

    def live(sl: slice) -> TeacherSignal:
        return LiveSignal(data.teacher_hidden, data.teacher_weight[sl])

    def ce(zs: torch.Tensor) -> torch.Tensor:
        return ref.cross_entropy(zs, labels)

    cases: dict[str, Case] = {}
    for t in (1.0, 2.0):
        tag = f"T{t:g}"
        cases[f"ce_{tag}"] = Case(terms({"ce": 1.0}, t), lambda sl: None, {"ce": ce})
        for name in KD_TERMS:
            cases[f"{name}_{tag}"] = Case(terms({name: 1.0}, t), live, {name: dense_ref(name, zt, t)})
        cases[f"mixed_ce_forward_kl_jsd_{tag}"] = Case(
            terms({"ce": 0.5, "forward_kl": 0.3, "jsd": 0.2}, t),
            live,
            {"ce": ce, "forward_kl": dense_ref("forward_kl", zt, t), "jsd": dense_ref("jsd", zt, t)},
        )

    def topk_case(signal: tuple[torch.Tensor, ...], t: float, vocab: int = V) -> Case:
        ids, kept, tail = signal

        def fkl(zs: torch.Tensor) -> torch.Tensor:
            return ref.topk_tail_forward_kl(zs, ids, kept.double(), tail.double(), temperature=t)

        return Case(
            terms({"forward_kl": 1.0}, t), lambda sl: TopKSignal(ids, kept, tail, vocab), {"forward_kl": fkl}
        )

    cases["topk_k10_T1"] = topk_case(topk_signal(zt, K), 1.0)
    cases["topk_k10_T2"] = topk_case(topk_signal(zt, K, temperature=2.0), 2.0)
    cases["topk_k10_one_shard_rows"] = topk_case(topk_signal(zt, K, ids=one_shard_ids(gen, K)), 1.0)
    for t in (1.0, 2.0):  # k = V: no tail, exactly the dense forward KL
        ids, kept, tail = topk_signal(zt, V, temperature=t)
        cases[f"topk_kV_vs_dense_forward_kl_T{t:g}"] = Case(
            terms({"forward_kl": 1.0}, t),
            lambda sl, s=(ids, kept, tail): TopKSignal(*s, V),
            {"forward_kl": dense_ref("forward_kl", zt, t)},
        )

    # dense terms on the top-k completion (the cache's values are at T = 1 here)
    def completion_case(names: dict[str, float], k: int, vocab: int, ids: torch.Tensor | None = None) -> Case:
        ids, kept, tail = topk_signal(zt, k, teacher_vocab=vocab, ids=ids)
        completed = ref.completed_teacher_logits(ids, kept.double(), tail.double(), V, vocab)
        refs: dict[str, Reference] = {}
        for name in names:
            if name == "ce":
                refs[name] = ce
            elif name == "forward_kl":  # the sparse term, not the completion

                def fkl(zs: torch.Tensor, s=(ids, kept, tail)) -> torch.Tensor:
                    return ref.topk_tail_forward_kl(zs, s[0], s[1].double(), s[2].double(), temperature=1.0)

                refs[name] = fkl
            else:
                refs[name] = dense_ref(name, completed, 1.0)
        return Case(terms(names), lambda sl: TopKSignal(ids, kept, tail, vocab), refs)

    cases["taid_topk_k10"] = completion_case({"taid": 1.0}, K, V)
    cases["taid_topk_k10_one_shard_rows"] = completion_case({"taid": 1.0}, K, V, ids=one_shard_ids(gen, K))
    cases["taid_topk_kV_vs_dense"] = completion_case({"taid": 1.0}, V, V)
    cases["taid_topk_kV_vs_dense"].refs["taid"] = dense_ref("taid", zt, 1.0)  # = against the live teacher
    cases[f"taid_topk_k10_teacher_vocab{TEACHER_VOCAB}"] = completion_case({"taid": 1.0}, K, TEACHER_VOCAB)
    cases[f"jsd_topk_k10_teacher_vocab{TEACHER_VOCAB}"] = completion_case({"jsd": 1.0}, K, TEACHER_VOCAB)
    cases["mixed_all_topk_k10"] = completion_case(
        {"ce": 0.2, "forward_kl": 0.3, "jsd": 0.1, "reverse_kl": 0.1, "taid": 0.3}, K, V
    )

    sampled_ids, sampled_weights = sampled_signal(gen)

    def sampled_ce(zs: torch.Tensor) -> torch.Tensor:
        return ref.sampled_cross_entropy(zs, sampled_ids, sampled_weights.double())

    def sampled(sl: slice) -> TeacherSignal:
        return SampledSignal(sampled_ids, sampled_weights)

    cases["sampled"] = Case(terms({"forward_kl": 1.0}), sampled, {"forward_kl": sampled_ce})
    cases["sampled_with_ce"] = Case(
        terms({"ce": 0.4, "forward_kl": 0.6}), sampled, {"ce": ce, "forward_kl": sampled_ce}
    )
    cases.update(uld_cases(data, gen, ce))
    return cases


def _teacher_shard(sl: slice, vocab: int) -> VocabShard:
    """The live ULD teacher's own vocabulary split, on the rank that holds student slice `sl`."""
    if sl.stop - sl.start == V:
        return VocabShard(0, vocab, None)
    rank = sl.start // (V // TP)
    return VocabShard.of(vocab, rank, TP, dist.group.WORLD)


def uld_cases(data: Data, gen: torch.Generator, ce: Reference) -> dict[str, Case]:
    """ULD against a teacher of another vocabulary (TEACHER_VOCAB ids, N_T positions): live and cached,
    positional and hand-made alignment maps, hybrid with matched ids. `uld_top_m` covers both
    vocabularies (exact) except in the no-tail case, where the merge of per-shard top-m lists is exact
    because the teacher's mass is all in its top k <= m (the truncation bound is 0)."""
    vt, n_t = TEACHER_VOCAB, N - 4
    t_hidden = torch.randn(n_t, H_TEACHER, generator=gen, dtype=torch.float64).float()
    t_weight = (torch.randn(vt, H_TEACHER, generator=gen, dtype=torch.float64) * 0.8).float()
    t_logits = t_hidden.double() @ t_weight.double().t()  # [N_T, V_T]
    positional = torch.where(torch.arange(N) < n_t, torch.arange(N), -1)
    handmade = torch.randint(0, n_t, (N,), generator=gen)
    handmade[torch.randperm(N, generator=gen)[: N // 3]] = -1
    s_ids = torch.randperm(V, generator=gen)[:15]
    t_ids = torch.randperm(vt, generator=gen)[:15]
    to_student = torch.full((vt,), -1, dtype=torch.long)
    to_student[t_ids] = s_ids

    def match(sl: slice) -> VocabMatch:
        mask = torch.zeros(V, dtype=torch.bool)
        mask[s_ids] = True
        return VocabMatch(mask[sl], to_student, len(s_ids))

    def uld_terms(weights: dict[str, float], t: float = 1.0, m: int = 64) -> Terms:
        return dataclasses.replace(terms(weights, t), uld_top_m=m)

    def live(index: torch.Tensor, hybrid: bool = False) -> Callable[[slice], TeacherSignal]:
        def signal(sl: slice) -> TeacherSignal:
            shard = _teacher_shard(sl, vt)
            return AlignedSignal(
                index,
                vt,
                LiveTop(t_hidden, t_weight[shard.start : shard.start + shard.size], shard),
                match(sl) if hybrid else None,
            )

        return signal

    def uld_ref(probs: torch.Tensor, index: torch.Tensor, t: float, hybrid: bool = False) -> Reference:
        def fn(zs: torch.Tensor) -> torch.Tensor:
            return ref.uld(zs, probs, index, temperature=t, matched=(s_ids, t_ids) if hybrid else None)

        return fn

    cases: dict[str, Case] = {}
    for t in (1.0, 2.0):
        probs_t = F.softmax(t_logits / t, -1)
        cases[f"uld_live_positional_T{t:g}"] = Case(
            uld_terms({"ce": 0.5, "uld": 1.5}, t),
            live(positional),
            {"ce": ce, "uld": uld_ref(probs_t, positional, t)},
        )
    probs = F.softmax(t_logits, -1)
    cases["uld_live_handmade_map"] = Case(
        uld_terms({"uld": 1.0}), live(handmade), {"uld": uld_ref(probs, handmade, 1.0)}
    )
    cases["uld_live_hybrid"] = Case(
        uld_terms({"uld": 1.0}, m=64),
        live(handmade, hybrid=True),
        {"uld": uld_ref(probs, handmade, 1.0, hybrid=True)},
    )
    cases["uld_live_hybrid"].terms = uld_terms({"uld": 1.0}, m=vt)  # the live teacher's top m = all of it

    ids, kept, tail = topk_signal(t_logits, K, teacher_vocab=vt)
    completed = ref.completed_teacher_probs(ids, kept.double(), tail.double(), vt)

    def cached(
        index: torch.Tensor, s: tuple = (ids, kept, tail), hybrid: bool = False
    ) -> Callable[[slice], TeacherSignal]:
        return lambda sl: AlignedSignal(index, vt, CachedTop(*s), match(sl) if hybrid else None)

    cases["uld_cached_topk_k10"] = Case(
        uld_terms({"uld": 1.0}), cached(handmade), {"uld": uld_ref(completed, handmade, 1.0)}
    )
    cases["uld_cached_hybrid_k10"] = Case(
        uld_terms({"ce": 0.3, "uld": 1.0}),
        cached(handmade, hybrid=True),
        {"ce": ce, "uld": uld_ref(completed, handmade, 1.0, hybrid=True)},
    )
    # all the teacher's mass on its top 5: m = 8 < V/tp merges per-shard lists, and is still exact
    top5 = F.log_softmax(t_logits, -1).topk(5, -1)
    renorm = top5.values - top5.values.logsumexp(-1, keepdim=True)
    no_tail = (top5.indices, renorm.float(), torch.zeros(n_t))
    dense = torch.zeros(n_t, vt, dtype=torch.float64).scatter(-1, top5.indices, renorm.exp())
    cases["uld_cached_no_tail_m8"] = Case(
        uld_terms({"uld": 1.0}, m=8), cached(positional, no_tail), {"uld": uld_ref(dense, positional, 1.0)}
    )

    # span-likelihood matching: student rows in 7 spans (some in none), the teacher's span likelihoods
    spans = torch.randint(-1, 7, (N,), generator=gen)
    teacher_ll = -(torch.rand(7, generator=gen, dtype=torch.float64) * 6 + 0.01)

    def span_ref(zs: torch.Tensor) -> torch.Tensor:
        return ref.span_likelihood(zs, data.labels, spans, teacher_ll)

    def with_spans(index: torch.Tensor) -> Callable[[slice], TeacherSignal]:
        return lambda sl: AlignedSignal(
            index, vt, CachedTop(ids, kept, tail), spans=SpanTargets(spans, teacher_ll)
        )

    cases.update(
        projection_cases(t_hidden, t_weight, t_logits, handmade, (ids, kept, tail), ce, gen, data.labels)
    )
    cases["span_alone"] = Case(terms({"span": 1.0}), with_spans(handmade), {"span": span_ref})
    cases["span_with_ce_and_uld"] = Case(
        uld_terms({"ce": 0.5, "uld": 1.5, "span": 0.8}),
        with_spans(handmade),
        {"ce": ce, "uld": uld_ref(completed, handmade, 1.0), "span": span_ref},
    )
    return cases


def projection_cases(
    t_hidden: torch.Tensor,
    t_weight: torch.Tensor,
    t_logits: torch.Tensor,
    index: torch.Tensor,
    cached_top: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ce: Reference,
    gen: torch.Generator,
    labels: torch.Tensor,
) -> dict[str, Case]:
    """`projected_kl` (the teacher projected onto the student's vocabulary): a map with teacher ids
    landing together on one student id and ids with none, live (the teacher's top m = all of it) at
    T = 1 and 2, and cached (top-k + tail), alone and beside CE and ULD. Every case but live T = 2 knows
    the teacher's own next tokens (in-context mapping to the student's labels): half of them among the
    cached top k, the others anywhere (outside a top k they change nothing)."""
    vt = TEACHER_VOCAB
    to_student = torch.randint(0, V, (vt,), generator=gen)
    to_student[:8] = to_student[8:16]  # pairs of teacher ids on one student id
    to_student[torch.randperm(vt, generator=gen)[: vt // 4]] = -1  # and ids with no student id
    projection = VocabProjection(to_student, exact=0, prefix=int((to_student >= 0).sum()), unmapped=0)
    every_id = torch.arange(vt).expand(t_logits.shape[0], vt)
    ids, kept, tail = cached_top
    own_next = torch.randint(0, vt, (t_logits.shape[0],), generator=torch.Generator().manual_seed(11))
    own_next[::2] = ids[::2, 3]  # the teacher's own next token among its kept ids

    def live(t: float, next_ids: torch.Tensor | None) -> Callable[[slice], TeacherSignal]:
        def signal(sl: slice) -> TeacherSignal:
            shard = _teacher_shard(sl, vt)
            weight = t_weight[shard.start : shard.start + shard.size]
            top = LiveTop(t_hidden, weight, shard)
            return AlignedSignal(index, vt, top, projection=projection, teacher_next=next_ids)

        return signal

    def reference(
        ids: torch.Tensor, probs: torch.Tensor, tail: torch.Tensor, t: float, next_ids: torch.Tensor | None
    ) -> Reference:
        return lambda zs: ref.projected_kl(
            zs, ids, probs, tail, to_student, index, temperature=t, teacher_next=next_ids, labels=labels
        )

    def projected_terms(weights: dict[str, float], t: float = 1.0) -> Terms:
        return dataclasses.replace(terms(weights, t), uld_top_m=vt)

    cases: dict[str, Case] = {}
    for t in (1.0, 2.0):
        probs = F.softmax(t_logits / t, -1)
        live_tail = (1 - probs.sum(-1)).clamp_min(0)
        next_ids = own_next if t == 1.0 else None
        cases[f"projected_live_T{t:g}"] = Case(
            projected_terms({"ce": 0.4, "projected_kl": 1.0}, t),
            live(t, next_ids),
            {"ce": ce, "projected_kl": reference(every_id, probs, live_tail, t, next_ids)},
        )
    # the live teacher's top 8 only (merged from per-shard lists), the rest in the tail
    probs = F.softmax(t_logits, -1)
    top8 = probs.topk(8, -1)
    cases["projected_live_top8"] = Case(
        dataclasses.replace(terms({"projected_kl": 1.0}), uld_top_m=8),
        live(1.0, own_next),
        {"projected_kl": reference(top8.indices, top8.values, 1 - top8.values.sum(-1), 1.0, own_next)},
    )
    cached_probs = kept.double().exp()
    # padding slots in the cache rows, and a map that leaves most ids (and so whole rows) unplaced
    padded_ids = ids.clone()
    padded_ids[:, -3:] = -1
    padded_kept = kept.masked_fill(padded_ids < 0, -torch.inf)
    sparse_map = torch.full((vt,), -1, dtype=torch.long)
    sparse_map[:4] = torch.tensor([3, 3, V - 1, 0])
    sparse = VocabProjection(sparse_map, exact=0, prefix=4, unmapped=vt - 4)
    unplaced = (sparse_map[padded_ids.clamp_min(0)] < 0) | (padded_ids < 0)
    assert unplaced.all(-1).any() and not unplaced.all()  # rows with no projected id, and rows with some

    def padded(sl: slice) -> TeacherSignal:
        top = CachedTop(padded_ids, padded_kept, tail)
        return AlignedSignal(index, vt, top, projection=sparse, teacher_next=own_next)

    cases["projected_cached_padding_unmapped_rows"] = Case(
        projected_terms({"ce": 0.2, "projected_kl": 1.0}),
        padded,
        {
            "ce": ce,
            "projected_kl": lambda zs: ref.projected_kl(
                zs,
                padded_ids,
                padded_kept.double().exp(),
                tail.double(),
                sparse_map,
                index,
                temperature=1.0,
                teacher_next=own_next,
                labels=labels,
            ),
        },
    )

    def cached(sl: slice) -> TeacherSignal:
        return AlignedSignal(
            index, vt, CachedTop(ids, kept, tail), projection=projection, teacher_next=own_next
        )

    cases["projected_cached_topk_k10"] = Case(
        projected_terms({"projected_kl": 1.0}),
        cached,
        {"projected_kl": reference(ids, cached_probs, tail.double(), 1.0, own_next)},
    )
    completed = ref.completed_teacher_probs(ids, kept.double(), tail.double(), vt)
    cases["projected_with_ce_and_uld"] = Case(
        projected_terms({"ce": 0.3, "uld": 0.5, "projected_kl": 1.0}),
        cached,
        {
            "ce": ce,
            "uld": lambda zs: ref.uld(zs, completed, index, temperature=1.0),
            "projected_kl": reference(ids, cached_probs, tail.double(), 1.0, own_next),
        },
    )
    return cases


def run_case(case: Case, data: Data, shard: VocabShard) -> dict[str, float]:
    sl = slice(shard.start, shard.start + shard.size)
    hidden = data.hidden.clone().requires_grad_()
    weight = data.weight[sl].clone().requires_grad_()
    kwargs: dict[str, Any] = {
        "terms": case.terms,
        "shard": shard,
        "teacher": case.teacher(sl),
        "tau": case.tau,
    }
    loss, sums = fused_output_loss(hidden, weight, data.labels, **kwargs)
    grad_hidden, grad_weight = torch.autograd.grad(loss, [hidden, weight])
    with torch.no_grad():
        loss_no_grad, _ = fused_output_loss(hidden, weight, data.labels, **kwargs)

    hidden64 = data.hidden.double().requires_grad_()
    weight64 = data.weight.double().requires_grad_()
    zs = hidden64 @ weight64.t()
    temperature = case.terms.temperature
    per_term = {name: fn(zs) for name, fn in case.refs.items()}
    assert set(per_term) == set(case.terms.weights), (set(per_term), case.terms.weights)
    total = sum(
        w * (1.0 if name == "ce" else temperature**2) * per_term[name].sum()
        for name, w in case.terms.weights.items()
    )
    ref_grad_hidden, ref_grad_weight = torch.autograd.grad(total, [hidden64, weight64])
    return {
        "loss_per_token": loss.item() / N,
        "ref_loss_per_token": total.item() / N,
        "loss_err": abs(loss.item() - total.item()) / N,
        "term_err": max(abs(sums[name].item() - per_term[name].sum().item()) / N for name in per_term),
        "grad_hidden_err": (grad_hidden.double() - ref_grad_hidden).abs().max().item(),
        "grad_weight_err": (grad_weight.double() - ref_grad_weight[sl]).abs().max().item(),
        "no_grad_err": abs(loss_no_grad.item() - loss.item()) / N,
        "ref_grad_max": max(ref_grad_hidden.abs().max().item(), ref_grad_weight[sl].abs().max().item()),
    }


def shard_coverage(ids: torch.Tensor) -> dict[str, float]:
    """Fractions of rows whose (non-padding) ids lie on both shards / on one only."""
    valid = ids >= 0
    low = ((ids < V // TP) & valid).any(-1)
    high = ((ids >= V // TP) & valid).any(-1)
    return {"both": (low & high).double().mean().item(), "one": (low ^ high).double().mean().item()}


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == TP, dist.get_world_size()
    group = dist.new_group(list(range(TP)))
    shard = VocabShard.of(V, rank, TP, group)
    torch.manual_seed(0)

    data = make_data()
    cases = build_cases(data)
    results = {name: run_case(case, data, shard) for name, case in cases.items()}

    coverage = {}
    for name in ("topk_k10_T1", "topk_k10_one_shard_rows", "sampled"):
        teacher = cases[name].teacher(slice(0, V))
        coverage[name] = shard_coverage(teacher.ids)
    coverage["labels"] = {"on_shard_0": (data.labels < V // TP).double().mean().item()}

    report(out, rank, {"shard": [shard.start, shard.size], "results": results, "coverage": coverage})
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
