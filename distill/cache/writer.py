"""`distillery cache`: run the teacher once over every prepared sequence and write its signal.

Work is split into shards of `cache.sequences_per_shard` consecutive sequences of one (domain, split)
store; data-parallel rank r takes shards r, r + dp, ...; inside a replica the teacher runs sharded (any
tp x pp, independent of the student's: a `TeacherJob` from `distill.engine.teacher_job`, whose frozen
model hands the last stage its hidden states and output-layer slice) and that stage's tp rank 0 writes.
A shard is written to `.tmp`, fsynced, renamed, and only then gets its `.json` marker (size, sha256),
so a finished shard is skipped on restart and an interrupted one is redone from the start. Draws of the sampled mode are
seeded per sequence, so the cache bytes do not depend on the layout, the shard split or restarts.
The manifest (written last by rank 0) records the teacher hash, the prepared data's fingerprint and
tokenizer hash, the mode and its parameters and every shard's checksum; see `format.py` for records.

Scale-out over jobs (a Slurm job array): `part=(i, n)` takes the plan's shards `i, i + n, ...` (then
split over its own data-parallel replicas as above). Parts write disjoint shards and identical progress
records; whichever part finds every shard complete writes the (identical) manifest, atomically. Since
shard bytes depend on nothing but the sequence and the config, the cache of an n-part run is the
cache of a 1-part run, byte for byte. A stop request (`distill/stop.py`) is agreed over all ranks
before each shard: finished shards stay, the job exits to be requeued.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from distill.atomic import atomic_write_bytes, atomic_write_json, read_json
from distill.cache import extract
from distill.cache.format import (
    FORMAT,
    MANIFEST,
    VERSION,
    SampledLayout,
    TopKLayout,
    encode_sampled,
    encode_topk,
)
from distill.config import CampaignConfig
from distill.data.prepared import SPLITS, PreparedData
from distill.engine import TeacherJob, teacher_job
from distill.errors import DataError
from distill.hub import hub_record
from distill.messages import say
from distill.models.teacher import open_teacher
from distill.models.weights import directory_sha256
from distill.stage import StageOutput, Status
from distill.stop import StopRequest


@dataclass(frozen=True)
class ShardWork:
    domain: str
    split: str
    index: int
    start: int
    end: int

    @property
    def stem(self) -> str:
        return f"{self.domain}/{self.split}/shard_{self.index:05d}"


def shard_plan(data: PreparedData, per_shard: int) -> list[ShardWork]:
    """Every (domain, split) store cut into shards, in a fixed order."""
    plan = []
    for domain in data.domains:
        for split in SPLITS:
            count = data.num_sequences(domain, split)
            for index, start in enumerate(range(0, count, per_shard)):
                plan.append(ShardWork(domain, split, index, start, min(count, start + per_shard)))
    return plan


def sequence_seed(seed: int, domain: str, split: str, index: int) -> int:
    key = f"{seed}/{domain}/{split}/{index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)


class CacheWriter:
    def __init__(
        self,
        config: CampaignConfig,
        job: TeacherJob,
        *,
        overwrite: bool,
        part: tuple[int, int] = (0, 1),
        stop: StopRequest | None = None,
    ) -> None:
        assert config.teacher is not None and config.cache is not None
        self.config, self.job, self.cfg = config, job, config.cache
        self.part, self.stop = part, stop or StopRequest()
        # paired data (a teacher with another tokenizer): the teacher runs over its own tokenization
        student_side = PreparedData(config.data.dir)
        self.data = PreparedData(config.data.dir, side="teacher") if student_side.paired else student_side
        weights = open_teacher(
            config.teacher.path, tokenizer_sha256=self.data.tokenizer_sha256, data_dir=self.data.directory
        )
        self.arch = weights.arch
        digest = job.broadcast_from_main(directory_sha256(weights.directory) if job.is_main else None)
        self.spec = self._spec(str(digest))
        self.out = self.cfg.dir
        self.output = StageOutput("cache", self.out, "cache.dir", self.spec, record=MANIFEST)
        self.complete = self._check_output(overwrite)
        self.model = (
            None
            if self.complete
            else job.frozen_model(
                weights.directory,  # the resolved weights it hashed (a checkpoint root may move on)
                precision=config.teacher.precision,
                tokenizer_sha256=self.data.tokenizer_sha256,
                data_dir=self.data.directory,
            )
        )

    def _spec(self, teacher_sha: str) -> dict[str, Any]:
        cfg = self.cfg
        params = (
            {"k": cfg.k, "temperature": cfg.temperature}
            if cfg.mode == "topk"
            else {"samples": cfg.samples, "seed": cfg.seed}
        )
        return {
            "format_version": VERSION,  # a half-written cache of another format version is not resumed
            "mode": cfg.mode,
            **params,
            "teacher_sha256": teacher_sha,
            "teacher_vocab_size": self.arch.vocab_size,
            "prepared_fingerprint": self.data.fingerprint,
            "tokenizer_sha256": self.data.tokenizer_sha256,
            "seq_len": self.data.seq_len,
            "sequences_per_shard": cfg.sequences_per_shard,
            **({"pairing": self.data.manifest["spec"]["pairing"]} if self.data.side == "teacher" else {}),
        }

    def _check_output(self, overwrite: bool) -> bool:
        """True if the cache is already complete; refuses another config's cache (main rank decides)."""
        decision: list[Any] = [None]
        if self.job.is_main:
            output = self.output
            try:
                status = output.check(overwrite=overwrite, shared=self.part[1] > 1)
                if status is Status.REPLACE:
                    output.clear()
                if status in (Status.FRESH, Status.REPLACE):
                    output.begin()
                decision[0] = status is Status.COMPLETE
            except Exception as exc:  # every rank raises it, none waits in the broadcast
                decision[0] = exc
        dist.broadcast_object_list(decision, src=0)
        if isinstance(decision[0], Exception):
            raise decision[0]
        return bool(decision[0])

    @property
    def writes(self) -> bool:
        return self.job.counting_rank

    def run(self) -> None:
        if self.complete:
            say("cache", f"{self.out} is complete, nothing to do")
            return
        plan = shard_plan(self.data, self.cfg.sequences_per_shard)
        index, parts = self.part
        ours = [w for i, w in enumerate(plan) if i % parts == index]
        mine = [w for i, w in enumerate(ours) if i % self.job.dp_size == self.job.dp_rank]
        todo = [w for w in mine if not (self.out / f"{w.stem}.json").is_file()]
        show = self.writes and self.job.dp_rank == 0
        positions = sum(w.end - w.start for w in todo) * self.data.seq_len
        # every rank checks for a stop as often as the busiest replica writes shards (a collective)
        rounds = torch.tensor([len(todo)], dtype=torch.int64, device=self.job.device)
        dist.all_reduce(rounds, op=dist.ReduceOp.MAX)
        with tqdm(
            total=positions, unit="tok", unit_scale=True, desc="cache", disable=not show, file=sys.stderr
        ) as bar:
            for turn in range(int(rounds.item())):
                self.stop.check(self.job.all_reduce_sum, self.job.device)
                if turn < len(todo):
                    self._write_shard(todo[turn])
                    bar.update((todo[turn].end - todo[turn].start) * self.data.seq_len)
                elif self.job.lockstep:  # expert-parallel peers in other replicas still run this round
                    self._write_shard(None)
        dist.barrier()
        if self.job.is_main:
            missing = [w.stem for w in plan if not (self.out / f"{w.stem}.json").is_file()]
            if not missing:
                self._write_manifest(plan)
            else:
                say(
                    "cache",
                    f"part {index}/{parts} complete; {len(missing)} shard(s) of other parts to go "
                    f"(the last part to finish writes the manifest)",
                )

    def _write_shard(self, work: ShardWork | None) -> None:
        """Run the teacher over `work`'s sequences and write the shard (None: a round without a shard,
        run only in lockstep). A lockstep job (an expert-parallel teacher: every forward is collective
        over an expert group spanning replicas) pads every round to the same number of full micro-batches
        on every rank; padded rows are all-zero sequences whose outputs are dropped (tokens are routed
        one by one and attention stays inside a sequence, so they change nothing of the real rows)."""
        size = self.config.teacher.micro_batch
        rows = np.arange(work.start, work.end) if work is not None else np.arange(0)
        store = self.data.store(work.domain, work.split) if work is not None else None
        tokens = (
            torch.from_numpy(store.batch(rows))
            if store is not None
            else torch.zeros(0, self.data.seq_len + 1, dtype=torch.int64, device=self.job.device)
        )
        micro = list(tokens.to(self.job.device).split(size))
        real = [m.shape[0] for m in micro]
        first = [(work.start if work is not None else 0) + i * size for i in range(len(micro))]
        if self.job.lockstep:
            count = torch.tensor([len(micro)], dtype=torch.int64, device=self.job.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            blank = torch.zeros(size, self.data.seq_len + 1, dtype=tokens.dtype, device=self.job.device)
            micro = [torch.cat([m, blank[: size - m.shape[0]]]) for m in micro]
            micro += [blank] * (int(count.item()) - len(micro))
            real += [0] * (len(micro) - len(real))
        sink = None
        if work is not None:
            path = self.out / f"{work.stem}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            sink = _ShardSink(path.with_suffix(".bin.tmp")) if self.writes else None

        def extract_signal(
            index: int, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
        ) -> None:
            n = real[index]  # the micro-batch's real sequences (the same on every rank of the replica)
            if n == 0:
                return
            assert work is not None
            records = self._records(
                hidden[:n], weight, labels[:n], work, first[index]
            )  # [n, s, h], [V/tp, h]
            if sink is not None:
                sink.add(records)

        assert self.model is not None
        self.model.forward(micro, extract_signal)
        if sink is not None and work is not None:
            sink.finish(self.out / f"{work.stem}.bin", self.out / f"{work.stem}.json", work)

    def _records(
        self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, work: ShardWork, start: int
    ) -> list[bytes]:
        """One record blob per sequence of this micro-batch (collective over the teacher's tp group). The
        output layer is applied here, a chunk of positions at a time (`extract.ChunkedLogits`)."""
        cfg = self.cfg
        assert self.model is not None
        b, s, _ = hidden.shape  # [b, s, h]
        flat = extract.ChunkedLogits(hidden.reshape(b * s, -1), weight)  # [b * s, V/tp], lazily
        targets = labels.reshape(-1)
        vocab_start, group = self.model.shard.start, self.model.shard.group
        if cfg.mode == "topk":
            ids, lps, tail, target = extract.topk_with_tail(
                flat, cfg.k, temperature=cfg.temperature, target=targets, vocab_start=vocab_start, group=group
            )
            layout = TopKLayout(self.arch.vocab_size, cfg.k)
            ids, lps = ids.view(b, s, -1).cpu().numpy(), lps.view(b, s, -1).cpu().numpy()
            tail, target = tail.view(b, s).cpu().numpy(), target.view(b, s).cpu().numpy()
            return [encode_topk(ids[i], lps[i], tail[i], target[i], layout) for i in range(b)]
        generators = [
            torch.Generator().manual_seed(sequence_seed(cfg.seed, work.domain, work.split, start + i))
            for i in range(b)
        ]
        uniforms = torch.stack([torch.rand(s, cfg.samples, generator=g) for g in generators]).to(flat.device)
        draws, target = extract.sample_ids(
            flat, uniforms.view(b * s, -1), target=targets, vocab_start=vocab_start, group=group
        )
        draws, target = draws.view(b, s, -1), target.view(b, s).cpu().numpy()
        layout = SampledLayout(self.arch.vocab_size, cfg.samples)
        blobs = []
        for i in range(b):
            distinct, unique, counts = extract.distinct_with_counts(draws[i])
            blobs.append(
                encode_sampled(
                    unique.cpu().numpy(),
                    counts.cpu().numpy(),
                    distinct.cpu().numpy(),
                    target[i],
                    layout,
                )
            )
        return blobs

    def _write_manifest(self, plan: list[ShardWork]) -> None:
        shards = []
        for work in plan:
            marker = self.out / f"{work.stem}.json"
            if not marker.is_file():
                raise DataError(
                    f"cache shard {work.stem} is missing after the run; re-run `distillery cache`"
                )
            shards.append(
                {"file": f"{work.stem}.bin", "domain": work.domain, "split": work.split, **read_json(marker)}
            )
        total_bytes = sum(s["bytes"] for s in shards)
        positions = sum(s["end"] - s["start"] for s in shards) * self.data.seq_len
        layout = self._layout_json()
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "spec": self.spec,
            "layout": layout,
            "teacher": {
                "path": str(self.config.teacher.path),
                **({"hub": hub} if (hub := hub_record(self.config.teacher.path)) else {}),
                "engine": self.job.engine,
                "arch": self.arch.to_json(),
            },
            "prepared": {"dir": str(self.data.directory)},
            "positions": positions,
            "bytes": total_bytes,
            "bytes_per_token": total_bytes / max(1, positions),
            "shards": shards,
        }
        self.output.finish(manifest)
        say(
            "cache", f"{positions:,} positions, {manifest['bytes_per_token']:.1f} bytes/token into {self.out}"
        )

    def _layout_json(self) -> dict[str, Any]:
        if self.cfg.mode == "topk":
            layout = TopKLayout(self.arch.vocab_size, self.cfg.k)
            return {
                "id_bits": layout.id_bits,
                "entry_bytes": layout.entry_bytes,
                "value_bits": layout.value_bits,
                "record_bytes": layout.record_bytes,
            }
        sampled = SampledLayout(self.arch.vocab_size, self.cfg.samples)
        return {"id_bits": sampled.id_bits, "id_bytes": sampled.id_bytes, "encoding": "delta+zlib"}


class _ShardSink:
    """Appends sequence blobs to a temporary file, hashing as it goes; `finish` makes the shard real."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.file = open(tmp, "wb")
        self.digest = hashlib.sha256()
        self.offsets = [0]

    def add(self, blobs: list[bytes]) -> None:
        for blob in blobs:
            self.file.write(blob)
            self.digest.update(blob)
            self.offsets.append(self.offsets[-1] + len(blob))

    def finish(self, path: Path, marker: Path, work: ShardWork) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, path)
        index = np.asarray(self.offsets, dtype="<u8").tobytes()
        atomic_write_bytes(path.with_suffix(".idx"), index)
        atomic_write_json(
            marker,
            {
                "shard": work.index,
                "start": work.start,
                "end": work.end,
                "bytes": self.offsets[-1],
                "sha256": self.digest.hexdigest(),
                "idx_sha256": hashlib.sha256(index).hexdigest(),
            },
        )


def build_cache(config: CampaignConfig, *, overwrite: bool = False, part: tuple[int, int] = (0, 1)) -> None:
    """The cache stage on this process (one per teacher rank: tp x pp x dp), or its part `(i, n)`."""
    if config.teacher is None or config.cache is None:
        raise DataError("this config has no `teacher` and `cache` sections")
    stop = StopRequest.from_environment().install()
    job = teacher_job(config)
    try:
        CacheWriter(config, job, overwrite=overwrite, part=part, stop=stop).run()
    finally:
        job.close()
        stop.uninstall()
