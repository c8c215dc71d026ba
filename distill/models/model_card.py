"""The model card (`README.md`) of an exported student: what a downstream team needs to trust it.

YAML front matter that the Hugging Face Hub reads (`library_name`, `pipeline_tag`, `tags`, `license` and
`datasets` when the config names them), then prose rendered from the checkpoint alone: its training
state carries the run's provenance (`distill/provenance.py`: resolved config and hash, distillery's
version and commit, data fingerprint and sources, teacher path, size, hash and signal), the step and
consumed sequences, TAID's tau and the mixture's final weights. `export` writes the card; `eval` writes
it again with the held-out bits per byte of the student, its teacher and the CE-only baseline.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from distill.checkpoint import read_training_state
from distill.eval_table import table_rows
from parallel.model import ModelArch

CARD = "README.md"


def _front_matter(config: dict[str, Any]) -> str:
    export = config.get("export") or {}
    hub_datasets = [
        s["dataset"]
        for d in (config.get("data") or {}).get("domains", {}).values()
        for s in d.get("sources", [])
        if s.get("dataset")
    ]
    matter: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["distillation", "knowledge-distillation", "distillery", *export.get("tags", [])],
    }
    if export.get("license"):
        matter["license"] = export["license"]
    datasets = list(dict.fromkeys([*hub_datasets, *export.get("datasets", [])]))
    if datasets:
        matter["datasets"] = datasets
    return "---\n" + yaml.safe_dump(matter, sort_keys=False) + "---\n"


def named(reference: str | None, sha256: str | None, hub: dict[str, Any] | None = None) -> str:
    """How the card names a model or tokenizer: a hub id as written after `hf://` (`org/name`, or
    `org/name@rev` with its revision) and the commit it resolved to (`hub`, when recorded); a local
    directory by its name and content hash only, since a card pushed to a hub must not show strangers a
    path on the machine that trained it."""
    if not reference:
        return "not recorded"
    if reference.startswith("hf://"):
        commit = f" (commit {hub['commit']})" if hub and hub.get("commit") else ""
        return f"`{reference.removeprefix('hf://')}`{commit}"
    digest = f" (sha256 {sha256[:16]})" if sha256 else ""
    return f"`{Path(reference).name}`{digest}"


def _without_paths(text: str) -> str:
    """`text` with each absolute path cut to its last two components (`cache /scratch/alice/run/cache
    (sampled)` -> `cache run/cache (sampled)`): a card shows no path of the machine that trained it."""
    return re.sub(r"(?<![\w.])/[^\s(),]+", lambda m: "/".join(Path(m.group(0)).parts[-2:]), text)


def _weights_text(weights: dict[str, float]) -> str:
    return ", ".join(f"{domain} {value:.3f}" for domain, value in weights.items())


def _sources_text(sources: list[dict[str, Any]]) -> str:
    out = []
    for s in sources:
        if s.get("dataset"):
            out.append(f"dataset `{s['dataset']}`" + (f" ({s['data_dir']})" if s.get("data_dir") else ""))
        else:
            names = [f["name"] if isinstance(f, dict) else Path(str(f)).name for f in s.get("files", [])]
            shown = ", ".join(f"`{n}`" for n in names[:3]) + (
                f" and {len(names) - 3} more" if len(names) > 3 else ""
            )
            out.append(f"{len(names)} file(s): {shown}")
    return "; ".join(out) or "not recorded"


def _eval_table(evaluation: dict[str, Any], own: str | None) -> list[str]:
    models = evaluation["models"]
    order = list(dict.fromkeys(n for n in (own, "teacher", "baseline") if n in models)) or list(models)
    label = {"teacher": "teacher", "baseline": "CE-only baseline (same size and tokens)", own: "this model"}
    rows = [
        "| domain | " + " | ".join(label.get(n, n) for n in order) + " |",
        "|---" * (len(order) + 1) + "|",
    ]
    for domain, scores in table_rows(evaluation, order):
        cells = [f"{s['bits_per_byte']:.4f}" if s else "-" for s in scores]
        rows.append(f"| {domain} | " + " | ".join(cells) + " |")
    p = evaluation["protocol"]
    return [
        "Held-out bits per UTF-8 byte (lower is better) on the documents of the first "
        f"{p['sequences']} held-out sequences of each domain, scored with lm-evaluation-harness's rolling "
        f"windows of {p['max_len']} tokens in {p['dtype']} (`distillery eval`; the same documents ship as "
        "an lm-eval task, see distillery's docs/evaluation.md).",
        "",
        *rows,
    ]


def render_model_card(
    arch: ModelArch,
    state: dict[str, Any],
    *,
    name: str,
    location: str,
    evaluation: dict[str, Any] | None = None,
    own: str | None = None,
) -> str:
    """The card of a student of `arch` whose checkpoint's training state is `state`; `location` is what
    the usage example passes to `from_pretrained`; `own` names this model among `evaluation`'s models."""
    prov = state.get("provenance") or {}
    config = prov.get("config") or {}
    lines = [_front_matter(config), f"# {name}", ""]
    teacher = prov.get("teacher")
    if teacher:
        lines.append(
            f"A {arch.num_parameters() / 1e6:.1f}M-parameter {arch.model_type} student distilled from "
            f"{named(teacher['path'], teacher.get('sha256'), teacher.get('hub'))} by distillery (pretraining distillation)."
        )
    else:
        lines.append(
            f"A {arch.num_parameters() / 1e6:.1f}M-parameter {arch.model_type} model trained by distillery without a teacher (next-token cross-entropy)."
        )
    lines += _minitron_lines(config, teacher)
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{location}")',
        f'model = AutoModelForCausalLM.from_pretrained("{location}")',
        "```",
        "",
    ]
    lines += [
        "## Student",
        "",
        f"- architecture: {arch.model_type}, {arch.num_layers} layers, hidden size {arch.hidden_size}, "
        f"{arch.num_attention_heads} attention heads ({arch.num_key_value_heads} key/value), FFN {arch.ffn_hidden_size}, "
        f"vocabulary {arch.vocab_size}, {'tied' if arch.tie_word_embeddings else 'untied'} embeddings, "
        f"{arch.num_parameters():,} parameters",
    ]
    data = prov.get("data") or {}
    tokenizer = ((config.get("data") or {}).get("tokenizer") or {}).get("path")
    lines.append(f"- tokenizer: {named(tokenizer, data.get('tokenizer_sha256'))}")
    lines += ["", "## Teacher", ""]
    if teacher:
        lines += [
            f"- model: {named(teacher['path'], teacher.get('sha256'), teacher.get('hub'))}",
            f"- parameters: {teacher['parameters']:,}",
            f"- fingerprint (sha256 of config and weights): {teacher.get('sha256', 'not recorded')}",
            f"- signal: {_without_paths(str(teacher.get('signal', teacher.get('mode'))))}",
        ]
    else:
        lines.append("- none: this model was trained on next-token cross-entropy only")
    seq_len = data.get("seq_len")
    consumed = state.get("consumed_sequences")
    lines += ["", "## Training data", ""]
    lines.append(f"- prepared data fingerprint: {data.get('fingerprint', 'not recorded')}")
    if consumed is not None and seq_len:
        lines.append(
            f"- tokens seen: {consumed * seq_len:,} ({state.get('step')} steps of {consumed // max(1, state.get('step') or 1)} sequences of {seq_len} tokens)"
        )
    for domain, sources in (data.get("sources") or {}).items():
        lines.append(f"- domain `{domain}`: {_sources_text(sources)}")
    mixture_cfg = (config.get("data") or {}).get("mixture") or {}
    final = state.get("mixture", {}).get("sampler", {})
    if mixture_cfg:
        lines.append(
            f"- mixture: {mixture_cfg.get('type')}"
            + (
                f", configured weights {_weights_text(mixture_cfg['weights'])}"
                if mixture_cfg.get("weights")
                else ""
            )
        )
    if final.get("domains") and final.get("weights"):
        lines.append(
            f"- final mixture weights: {_weights_text(dict(zip(final['domains'], final['weights'], strict=True)))}"
        )
    loss = config.get("loss") or {}
    weights = {k: v for k, v in (loss.get("weights") or {}).items() if v}
    lines += ["", "## Objective", ""]
    lines.append(
        "- loss terms and weights: " + (", ".join(f"{k} {v:g}" for k, v in weights.items()) or "not recorded")
    )
    lines.append(f"- temperature: {loss.get('temperature', 'not recorded')}")
    if "taid" in weights:
        taid = loss.get("taid") or {}
        tau = (state.get("objective") or {}).get("taid", {}).get("tau")
        lines.append(
            f"- TAID: tau from {taid.get('tau_start')} towards {taid.get('tau_end')} (alpha {taid.get('alpha')}, "
            f"beta {taid.get('beta')})"
            + (f", final tau {tau:.4f}" if tau is not None and not math.isnan(tau) else "")
        )
    else:
        lines.append("- TAID: not used")
    if evaluation:
        lines += ["", "## Evaluation", "", *_eval_table(evaluation, own)]
    version = prov.get("distillery") or {}
    lines += [
        "",
        "## Provenance",
        "",
        f"- trained by: {_engine_text(config)}",
        f"- campaign config sha256: {prov.get('config_sha256', 'not recorded')}",
        f"- distillery {version.get('version') or 'unknown version'}, commit {version.get('commit') or 'unknown'}",
        f"- checkpoint step: {state.get('step', 'not recorded')}",
        "",
    ]
    return "\n".join(lines)


def _minitron_lines(config: dict[str, Any], teacher: dict[str, Any] | None) -> list[str]:
    """How the student's initial weights and its teacher were made, when Minitron's stages ran."""
    lines = []
    prune = config.get("prune")
    source = (
        named(teacher["path"], teacher.get("sha256"), teacher.get("hub"))
        if teacher
        else named((config.get("teacher") or {}).get("path"), None)
    )
    if prune:
        seq_len = (config.get("data") or {}).get("seq_len") or 0
        tokens = prune["calibration_sequences"] * seq_len
        lines.append(
            f"Its initial weights were pruned from {source} "
            f"(method {prune['method']}"
            + (
                f", layers chosen by {prune['depth_metric'].replace('_', ' ')}"
                if prune["method"] != "width"
                else ""
            )
            + f", {tokens:,} calibration tokens)."
        )
    correct = config.get("correct")
    if correct:
        lines.append(
            f"The teacher was first corrected: {named(str(correct.get('source')), None)} fine-tuned for "
            f"{correct['steps']} steps of next-token cross-entropy on the distillation data."
        )
    return ["", *lines] if lines else []


def _engine_text(config: dict[str, Any]) -> str:
    """Which engine sharded the student, and how (from the campaign config)."""
    if not config:
        return "not recorded"
    if config.get("engine") == "deepspeed":
        return f"DeepSpeed ZeRO-{(config.get('deepspeed') or {}).get('zero_stage', 2)} (Hugging Face modules)"
    parallel = config.get("parallel") or {}
    return f"megatron-core (tp {parallel.get('tp', 1)}, pp {parallel.get('pp', 1)})"


def model_card_of(
    ckpt: Path,
    arch: ModelArch,
    out: Path,
    evaluation: dict[str, Any] | None = None,
    own: str | None = None,
) -> str:
    """The model card of the export of checkpoint `ckpt` into `out` (see `model_card.py`)."""
    state = read_training_state(ckpt)
    run = ((state.get("provenance") or {}).get("config") or {}).get("run") or {}
    name = f"{run['name']} student" if run.get("name") else out.name
    export = ((state.get("provenance") or {}).get("config") or {}).get("export") or {}
    location = export.get("hub_id") or Path(out).name  # never the path on this machine
    return render_model_card(arch, state, name=name, location=location, evaluation=evaluation, own=own)
