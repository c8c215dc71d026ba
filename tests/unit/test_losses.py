"""The fused, chunked, vocabulary-sharded losses against the dense references of loss_reference.py.

Single-process unit tests (one process holds the whole vocabulary, group None) for each term, the
chunking, the cached teacher signals, the no-grad path, and every case of
tests/distributed/ranks/check_losses.py; tests/distributed/test_losses_sharded.py runs those cases with
the vocabulary split over two gloo ranks. Everything is compared in values AND gradients (hidden states
and output weight) to float64 references, within TOLERANCE: the loss per token, the gradients of the
summed loss.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from distill.losses.fused import Terms, fused_output_loss
from distill.losses.signal import LiveSignal, SampledSignal, TopKSignal
from parallel.vocab import VocabShard
from tests import loss_reference as ref
from tests.distributed.ranks.check_losses import (
    CHUNK,
    KD_TERMS,
    TEACHER_VOCAB,
    Case,
    V,
    build_cases,
    dense_ref,
    make_data,
    one_shard_ids,
    run_case,
    sampled_signal,
    terms,
    topk_signal,
)

TOLERANCE = 1e-5
ERRORS = ("loss_err", "term_err", "grad_hidden_err", "grad_weight_err", "no_grad_err")
WHOLE = VocabShard(0, V, None)  # one process holds the whole vocabulary


@pytest.fixture(scope="module")
def data():
    return make_data()


def live(data):
    return lambda sl: LiveSignal(data.teacher_hidden, data.teacher_weight[sl])


def ce_ref(data):
    return lambda zs: ref.cross_entropy(zs, data.labels)


def assert_matches(found: dict[str, float], label: object = "", min_grad: float = 0.05) -> None:
    errors = {k: found[k] for k in ERRORS}
    assert max(errors.values()) < TOLERANCE, (label, errors)
    assert found["ref_grad_max"] >= min_grad, (label, found)  # a gradient of a useful size, not ~0


def loss_and_grads(data, terms_: Terms, teacher, tau: float = 0.0):
    hidden = data.hidden.clone().requires_grad_()
    weight = data.weight.clone().requires_grad_()
    loss, sums = fused_output_loss(
        hidden, weight, data.labels, terms=terms_, shard=WHOLE, teacher=teacher, tau=tau
    )
    return (loss / data.hidden.shape[0], *torch.autograd.grad(loss, [hidden, weight]))  # loss per token


# --- dense divergences against a live teacher ---------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", KD_TERMS)
def test_divergence_with_ce_matches_reference(data, name, temperature):
    zt = data.teacher_logits
    case = Case(
        terms({"ce": 0.3, name: 0.7}, temperature),
        live(data),
        {"ce": ce_ref(data), name: dense_ref(name, zt, temperature)},
    )
    assert_matches(run_case(case, data, WHOLE), (name, temperature))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_ce_alone_ignores_the_temperature(data, temperature):
    case = Case(terms({"ce": 1.0}, temperature), lambda sl: None, {"ce": ce_ref(data)})
    assert_matches(run_case(case, data, WHOLE), temperature)


@pytest.mark.parametrize("tau", [0.0, 0.4, 1.0])
def test_taid_matches_reference_at_every_tau(data, tau):
    case = Case(
        terms({"taid": 1.0}, 2.0), live(data), {"taid": dense_ref("taid", data.teacher_logits, 2.0, tau)}, tau
    )
    # at tau = 0 the target is the (detached) student itself: the gradient is 0
    assert_matches(run_case(case, data, WHOLE), tau, min_grad=0.05 if tau > 0 else 0.0)


@pytest.mark.parametrize("chunk", [1, 4, CHUNK, 29, 30, 64, None])
def test_chunk_size_changes_nothing(data, chunk):
    """30 tokens in chunks of 1, 4, 7, 29 (not dividing), 30, 64 (one chunk) and auto."""
    zt = data.teacher_logits
    base = terms({"ce": 0.5, "forward_kl": 0.3, "jsd": 0.1, "taid": 0.1}, 2.0)
    case = Case(
        dataclasses.replace(base, chunk_tokens=chunk),
        live(data),
        {
            "ce": ce_ref(data),
            "forward_kl": dense_ref("forward_kl", zt, 2.0),
            "jsd": dense_ref("jsd", zt, 2.0),
            "taid": dense_ref("taid", zt, 2.0),
        },
    )
    assert_matches(run_case(case, data, WHOLE), chunk)


# --- the cached signals -------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_with_k_equal_to_the_vocabulary_is_the_dense_forward_kl(data, temperature):
    zt = data.teacher_logits
    ids, kept, tail = topk_signal(zt, V, temperature=temperature)
    assert float(tail.abs().max()) == 0.0
    case = Case(
        terms({"forward_kl": 1.0}, temperature),
        lambda sl: TopKSignal(ids, kept, tail, V),
        {"forward_kl": dense_ref("forward_kl", zt, temperature)},
    )
    assert_matches(run_case(case, data, WHOLE), temperature)
    # and the same numbers as against the live teacher, not just within tolerance of the reference
    sparse = loss_and_grads(data, case.terms, TopKSignal(ids, kept, tail, V))
    dense = loss_and_grads(data, case.terms, LiveSignal(data.teacher_hidden, data.teacher_weight))
    for a, b in zip(sparse, dense, strict=True):
        assert float((a - b).detach().abs().max()) < TOLERANCE


@pytest.mark.parametrize("k", [1, 10, V - 1])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_tail_forward_kl_matches_reference(data, k, temperature):
    ids, kept, tail = topk_signal(data.teacher_logits, k, temperature=temperature)
    assert float(tail.min()) > 0

    def reference(zs):
        return ref.topk_tail_forward_kl(zs, ids, kept.double(), tail.double(), temperature=temperature)

    case = Case(
        terms({"ce": 0.25, "forward_kl": 0.75}, temperature),
        lambda sl: TopKSignal(ids, kept, tail, V),
        {"ce": ce_ref(data), "forward_kl": reference},
    )
    assert_matches(run_case(case, data, WHOLE), (k, temperature))


def test_topk_with_arbitrary_kept_ids(data):
    """The kept ids need not be the largest: any distinct ids with their log-probs and the tail."""
    ids, kept, tail = topk_signal(
        data.teacher_logits, 10, ids=one_shard_ids(torch.Generator().manual_seed(3), 10)
    )

    def reference(zs):
        return ref.topk_tail_forward_kl(zs, ids, kept.double(), tail.double(), temperature=1.0)

    case = Case(
        terms({"forward_kl": 1.0}), lambda sl: TopKSignal(ids, kept, tail, V), {"forward_kl": reference}
    )
    assert_matches(run_case(case, data, WHOLE))


def test_sampled_matches_dense_cross_entropy(data):
    ids, weights = sampled_signal(torch.Generator().manual_seed(5))
    assert bool((ids < 0).any()) and bool((ids >= 0).all(-1).any())  # padded rows and full rows
    for row in ids:
        valid = row[row >= 0]
        assert len(valid.unique()) == len(valid)

    def reference(zs):
        return ref.sampled_cross_entropy(zs, ids, weights.double())

    case = Case(
        terms({"ce": 0.5, "forward_kl": 0.5}),
        lambda sl: SampledSignal(ids, weights),
        {"ce": ce_ref(data), "forward_kl": reference},
    )
    assert_matches(run_case(case, data, WHOLE))


@pytest.mark.parametrize("name", ["reverse_kl", "jsd", "taid"])
def test_sampled_teacher_refuses_a_term_that_needs_a_distribution(data, name):
    ids, weights = sampled_signal(torch.Generator().manual_seed(5))
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match="sampled cache"):
            fused_output_loss(
                data.hidden.clone().requires_grad_(),
                data.weight.clone().requires_grad_(),
                data.labels,
                terms=terms({"forward_kl": 0.5, name: 0.5}),
                shard=WHOLE,
                teacher=SampledSignal(ids, weights),
            )


def test_kd_terms_without_a_teacher_are_refused(data):
    with pytest.raises(ValueError, match="need a teacher"):
        fused_output_loss(
            data.hidden, data.weight, data.labels, terms=terms({"ce": 1.0, "jsd": 1.0}), shard=WHOLE
        )


# --- TAID (and the other dense terms) on the top-k completion ------------------------------------


@pytest.mark.parametrize("name", ["taid", "jsd", "reverse_kl", "skew_forward_kl"])
def test_dense_terms_on_the_topk_completion_match_reference(data, name):
    ids, kept, tail = topk_signal(data.teacher_logits, 10)
    completed = ref.completed_teacher_logits(ids, kept.double(), tail.double(), V, V)
    case = Case(
        terms({name: 1.0}),
        lambda sl: TopKSignal(ids, kept, tail, V),
        {name: dense_ref(name, completed, 1.0)},
    )
    assert_matches(run_case(case, data, WHOLE), name)


def test_taid_on_topk_with_k_equal_to_the_vocabulary_is_taid_on_the_live_teacher(data):
    ids, kept, tail = topk_signal(data.teacher_logits, V)
    case_terms = terms({"taid": 1.0})
    cached = loss_and_grads(data, case_terms, TopKSignal(ids, kept, tail, V), tau=0.4)
    live_ = loss_and_grads(data, case_terms, LiveSignal(data.teacher_hidden, data.teacher_weight), tau=0.4)
    for a, b in zip(cached, live_, strict=True):
        assert float((a - b).detach().abs().max()) < TOLERANCE
    case = Case(
        case_terms,
        lambda sl: TopKSignal(ids, kept, tail, V),
        {"taid": dense_ref("taid", data.teacher_logits, 1.0)},
    )
    assert_matches(run_case(case, data, WHOLE))


def test_completion_gives_ids_beyond_the_teacher_vocabulary_probability_zero(data):
    ids, kept, tail = topk_signal(data.teacher_logits, 10, teacher_vocab=TEACHER_VOCAB)
    assert int(ids.max()) < TEACHER_VOCAB < V
    teacher = TopKSignal(ids, kept, tail, TEACHER_VOCAB)
    logprobs = teacher.logprobs(slice(None), 1.0, WHOLE).double()  # [N, V]
    probs = logprobs.exp()
    assert float(probs[:, TEACHER_VOCAB:].max()) == 0.0
    assert float((probs.sum(-1) - 1).abs().max()) < 1e-6
    expected = torch.log_softmax(
        ref.completed_teacher_logits(ids, kept.double(), tail.double(), V, TEACHER_VOCAB), -1
    )
    inside = slice(0, TEACHER_VOCAB)
    assert float((logprobs[:, inside] - expected[:, inside]).abs().max()) < TOLERANCE
    # the unkept ids of the teacher's vocabulary share the tail equally
    unkept = torch.ones(ids.shape[0], TEACHER_VOCAB, dtype=torch.bool).scatter_(-1, ids, False)
    fill = probs[:, inside][unkept].view(ids.shape[0], -1)
    assert float((fill - fill[:, :1]).abs().max()) < 1e-7
    expected_fill = tail.double() / (TEACHER_VOCAB - 10) / (kept.double().exp().sum(-1) + tail.double())
    assert float((fill[:, 0] - expected_fill).abs().max()) < 1e-7


@pytest.mark.parametrize("name", ["taid", "jsd"])
def test_terms_on_a_completion_over_a_smaller_teacher_vocabulary_match_reference(data, name):
    ids, kept, tail = topk_signal(data.teacher_logits, 10, teacher_vocab=TEACHER_VOCAB)
    completed = ref.completed_teacher_logits(ids, kept.double(), tail.double(), V, TEACHER_VOCAB)
    case = Case(
        terms({"ce": 0.2, name: 0.8}),
        lambda sl: TopKSignal(ids, kept, tail, TEACHER_VOCAB),
        {"ce": ce_ref(data), name: dense_ref(name, completed, 1.0)},
    )
    assert_matches(run_case(case, data, WHOLE), name)


# --- without gradients --------------------------------------------------------------------------


def test_no_grad_path_gives_the_same_value(data):
    case_terms = terms({"ce": 0.5, "forward_kl": 0.25, "taid": 0.25}, 2.0)
    teacher = LiveSignal(data.teacher_hidden, data.teacher_weight)
    hidden = data.hidden.clone().requires_grad_()
    weight = data.weight.clone().requires_grad_()
    kwargs = {"terms": case_terms, "shard": WHOLE, "teacher": teacher, "tau": 0.4}
    loss, sums = fused_output_loss(hidden, weight, data.labels, **kwargs)
    assert loss.requires_grad
    with torch.no_grad():
        loss_ng, sums_ng = fused_output_loss(hidden, weight, data.labels, **kwargs)
    loss_plain, _ = fused_output_loss(
        data.hidden, data.weight, data.labels, **kwargs
    )  # nothing requires grad
    for value in (loss_ng, loss_plain):
        assert not value.requires_grad
        assert value.dtype == torch.float32 and value.shape == ()
        assert float(value) == float(loss.detach())
    assert sums_ng.keys() == sums.keys() == {"ce", "forward_kl", "taid"}
    for name in sums:
        assert float(sums_ng[name]) == float(sums[name])


# --- every distributed case in one process (at tp = 2: tests/distributed/test_losses_sharded.py) -----


@pytest.mark.parametrize("name", list(build_cases(make_data())))
def test_distributed_case_in_one_process(data, name):
    assert_matches(run_case(build_cases(data)[name], data, WHOLE), name)


def test_every_configurable_loss_term_has_one_registry_entry_and_the_config_lists_agree_with_it():
    from distill.config.loss import CROSS_TOKENIZER_TERMS, KD_TERMS, LossWeightsConfig
    from distill.losses.terms import TERMS

    assert set(LossWeightsConfig.model_fields) - {"ce"} == set(TERMS) == set(KD_TERMS)
    assert set(CROSS_TOKENIZER_TERMS) == {name for name, term in TERMS.items() if term.accepts("aligned")}
    assert {name for name, term in TERMS.items() if term.accepts("sampled")} == {
        "forward_kl"
    }  # the schema's rule


@pytest.mark.parametrize(
    ("name", "signal", "expected"),
    [
        (
            "reverse_kl",
            "sampled",
            "loss term reverse_kl needs the teacher's distribution; a sampled cache holds draws only",
        ),
        ("taid", "aligned", "loss term taid needs a teacher with the student's tokenizer"),
        ("uld", "topk", "loss term uld needs a teacher aligned across tokenizers (a paired prepare)"),
        ("span", "live", "loss term span needs a teacher aligned across tokenizers (a paired prepare)"),
    ],
)
def test_a_term_refuses_a_teacher_signal_it_cannot_read(name, signal, expected):
    from distill.losses.signal import AlignedSignal, CachedTop, LiveSignal, SampledSignal, TopKSignal
    from distill.losses.terms import TERMS

    n, v, h = 4, 16, 8
    teacher = {
        "sampled": SampledSignal(torch.zeros(n, 2, dtype=torch.long), torch.full((n, 2), 0.5)),
        "aligned": AlignedSignal(
            torch.arange(n),
            v,
            CachedTop(torch.zeros(n, 2, dtype=torch.long), torch.zeros(n, 2), torch.zeros(n)),
        ),
        "topk": TopKSignal(torch.zeros(n, 2, dtype=torch.long), torch.zeros(n, 2), torch.zeros(n), v),
        "live": LiveSignal(torch.randn(n, h), torch.randn(v, h)),
    }[signal]
    assert not TERMS[name].accepts(signal)
    with pytest.raises(ValueError, match=re.escape(expected)):
        fused_output_loss(
            torch.randn(n, h, requires_grad=True),
            torch.randn(v, h, requires_grad=True),
            torch.zeros(n, dtype=torch.long),
            terms=Terms(weights={name: 1.0}),
            shard=VocabShard.of(v, 0, 1, None),
            teacher=teacher,
        )
