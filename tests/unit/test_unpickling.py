"""Checkpoint files cannot run code when loaded: RNG states, torch.distributed.checkpoint metadata and
byte items are refused when they name anything but plain data (a harmless marker object stands in
for an exploit: loading it would create a directory)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from distill.engine.megatron.checkpoint import _read_rng_file
from distill.unpickling import UnsafeCheckpointError, no_code_execution


class Marker:
    """Unpickling this creates `path`: the stand-in for arbitrary code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (str(self.path),))


def test_damaged_safetensors_rng_file_is_a_named_error(tmp_path):
    (tmp_path / "rank_00000.safetensors").write_bytes(pickle.dumps(Marker(tmp_path / "ran")))
    with pytest.raises(Exception, match=r"rank_00000.safetensors is not a readable safetensors file"):
        _read_rng_file(tmp_path / "rank_00000")
    assert not (tmp_path / "ran").exists()


def _metadata_checkpoint(path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.arange(4.0)}, storage_writer=dcp.FileSystemWriter(str(path)), no_dist=True)


def test_real_metadata_loads_under_the_allow_list(tmp_path):
    """(Whole megatron checkpoints load under the guard in every resume test of test_training.)"""
    import torch.distributed.checkpoint as dcp

    _metadata_checkpoint(tmp_path / "ckpt")
    with no_code_execution():
        metadata = dcp.FileSystemReader(str(tmp_path / "ckpt")).read_metadata()
    assert metadata.state_dict_metadata["w"].size == torch.Size([4])


def test_metadata_naming_a_callable_is_refused(tmp_path):
    import torch.distributed.checkpoint as dcp

    _metadata_checkpoint(tmp_path / "ckpt")
    marker = tmp_path / "ran"
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(Marker(marker)))
    with no_code_execution(), pytest.raises(UnsafeCheckpointError, match="asks to load os.makedirs"):
        dcp.FileSystemReader(str(tmp_path / "ckpt")).read_metadata()
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # the guard cleans up


def test_torch_load_inside_the_guard_is_weights_only(tmp_path):
    marker = tmp_path / "ran"
    torch.save(Marker(marker), tmp_path / "item.pt")
    with no_code_execution(), pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "item.pt", weights_only=False)  # what upstream's byte items do
    assert not marker.exists()
