"""`eval`: score models on prepared held-out data, write `eval.json`, print the bits-per-byte table.

The output directory is written whole and atomically: `eval.json` (per model and domain: ce, ppl,
bits_per_byte, tokens, bytes, documents; the data fingerprint and the protocol; each model's content
hash) and `lm_eval/`, the same documents as an lm-evaluation-harness task per domain (see
docs/evaluation.md), so a downstream team can check the numbers with a client we did not write. Under the
stage contract its spec is the data fingerprint, the protocol and the models' content hashes: an
eval of the same models is skipped, an eval of a newer export replaces the old one.

The teacher's numbers depend only on the teacher and the prepared data, so they are computed once and
kept beside the data (`<data.dir>/eval/teacher-<hash>.json`) for every later eval of that data.

A model need not share the data's tokenizer (a ULD teacher): it is scored on the same documents'
text re-encoded with its own tokenizer (see `score.py`), and `eval.json` records per model which
tokenizer it was scored with. The documents, and so the lm-eval task files, are always the data's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.atomic import atomic_directory, atomic_write_json, read_json
from distill.data.prepared import PreparedData
from distill.data.tokenizer import TokenizerInfo, load_tokenizer
from distill.eval.score import find_data_tokenizer, model_weights, score_model
from distill.eval.text import heldout_documents
from distill.eval_table import format_table
from distill.hub import ModelLocation
from distill.messages import say
from distill.models.weights import directory_sha256
from distill.stage import StageOutput, Status

EVAL_FILE = "eval.json"
FORMAT = "distillery.eval"
VERSION = 1
LM_EVAL_DIR = "lm_eval"
TASK_PREFIX = "distillery_heldout"
LM_EVAL_METRICS = (
    ("word_perplexity", "weighted_perplexity"),
    ("byte_perplexity", "weighted_perplexity"),
    ("bits_per_byte", "bits_per_byte"),
)


@dataclass(frozen=True)
class ModelToEval:
    name: str  # the column in the table ("teacher", "student", ...)
    path: ModelLocation  # a directory, checkpoint or hub id
    reused: bool = False  # a teacher: its numbers are kept beside the prepared data


@dataclass(frozen=True)
class EvalSettings:
    sequences: int = 32  # held-out sequences per domain whose complete documents are scored
    dtype: str = "float32"
    micro_batch: int = 8


def protocol(data: PreparedData, settings: EvalSettings) -> dict[str, Any]:
    return {
        "windows": "rolling",  # lm-evaluation-harness loglikelihood_rolling
        "max_len": data.seq_len,
        "sequences": settings.sequences,
        "dtype": settings.dtype,
        "version": VERSION,
    }


def evaluate(
    models: list[ModelToEval],
    data_dir: Path,
    out: Path,
    settings: EvalSettings = EvalSettings(),
    *,
    key: str = "eval.dir",
    overwrite: bool = False,
    progress: bool = True,
    show_table: bool = True,
) -> dict[str, Any]:
    """Score `models` on the held-out documents of `data_dir` into `out` (skipped when complete)."""
    data = PreparedData(data_dir)
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must differ: {names}")
    hashes = {m.name: directory_sha256(model_weights(m.path).directory) for m in models}
    spec = {"prepared_fingerprint": data.fingerprint, "protocol": protocol(data, settings), "models": hashes}
    output = StageOutput("eval", out, key, spec, record=EVAL_FILE, replace_stale=True)
    if output.check(overwrite=overwrite) is Status.COMPLETE:
        say("eval", f"{out} is complete, nothing to do")
        return read_json(Path(out) / EVAL_FILE)
    # the held-out text is decoded with the data's tokenizer whichever models are scored; found
    # before scoring, so a missing one fails before a model is loaded
    tokenizers = [load_tokenizer(model_weights(m.path).tokenizer_dir) for m in models]
    data_tokenizer = find_data_tokenizer(data, tokenizers)
    results = {}
    for model in models:
        found = _score(model, hashes[model.name], data, settings, progress, data_tokenizer)
        results[model.name] = {"path": str(model.path), "sha256": hashes[model.name], **found}
    record = {
        "format": FORMAT,
        "version": VERSION,
        "spec": spec,
        "data": {"dir": str(data.directory), "fingerprint": data.fingerprint},
        "protocol": spec["protocol"],
        "models": results,
    }
    with atomic_directory(Path(out), overwrite=True) as tmp:
        write_lm_eval_tasks(
            data, settings.sequences, data_tokenizer, tmp / LM_EVAL_DIR, Path(out) / LM_EVAL_DIR
        )
        atomic_write_json(tmp / EVAL_FILE, record)
    if show_table:
        say("eval", format_table(record))
    return record


def _score(
    model: ModelToEval,
    sha256: str,
    data: PreparedData,
    settings: EvalSettings,
    progress: bool,
    data_tokenizer: TokenizerInfo,
) -> dict[str, Any]:
    """A model's scores, from beside the data when a teacher was scored there before."""
    kept_spec = {"model_sha256": sha256, "prepared_fingerprint": data.fingerprint, **protocol(data, settings)}
    digest = hashlib.sha256(json.dumps(kept_spec, sort_keys=True).encode()).hexdigest()[:16]
    kept = data.directory / "eval" / f"teacher-{digest}.json"
    if model.reused and kept.is_file():
        found = read_json(kept)
        # scores kept before models were recorded with their tokenizer lack the per-document
        # round-trip counts: scored again, once
        if found.get("spec") == kept_spec and "tokenizer" in found["scores"]:
            say("eval", f"{model.name}: reusing {kept}")
            return found["scores"]
    scores = score_model(
        model.path,
        data,
        sequences=settings.sequences,
        dtype=settings.dtype,
        micro_batch=settings.micro_batch,
        progress=progress,
        data_tokenizer=data_tokenizer,
        name=model.name,
    )
    if model.reused:
        try:
            kept.parent.mkdir(exist_ok=True)
            atomic_write_json(kept, {"spec": kept_spec, "scores": scores})
        except OSError as exc:  # a read-only shared data directory: recomputed next time, nothing lost
            say("eval", f"warning: cannot keep the teacher's scores in {kept} ({exc})")
    return scores


def write_lm_eval_tasks(
    data: PreparedData, sequences: int, tokenizer: TokenizerInfo, out: Path, final: Path
) -> None:
    """Per domain the scored documents (`<domain>.jsonl`, field `text`) and an lm-eval task over them;
    `out` is written now and moved to `final` (the path the task files name). `tokenizer` must be the
    data's: the held-out ids are decoded with it (lm-eval then encodes the text with each model's)."""
    out.mkdir(parents=True)
    for domain in data.domains:
        documents = heldout_documents(data, domain, sequences, tokenizer)
        if not documents:
            continue
        lines = "".join(json.dumps({"text": d.text}, ensure_ascii=False) + "\n" for d in documents)
        (out / f"{domain}.jsonl").write_text(lines, encoding="utf-8")
        task = {
            "task": f"{TASK_PREFIX}_{domain}",
            "tag": [TASK_PREFIX],
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(final / f"{domain}.jsonl")}},
            "test_split": "test",
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [  # aggregations as lm-eval registers them; all three: lower is better
                {"metric": metric, "aggregation": aggregation, "higher_is_better": False}
                for metric, aggregation in LM_EVAL_METRICS
            ],
            "metadata": {"version": 1.0},
        }
        (out / f"{TASK_PREFIX}_{domain}.yaml").write_text(json.dumps(task, indent=2) + "\n", encoding="utf-8")
