"""What `parallel.cpu_compat` makes work on a CUDA-less machine, single-process.

Each test first shows the failure without the layer (`restore()`), then the same call working after
`apply()`. The layer is left applied whatever happens: other tests in the same process rely on it.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from parallel import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is a no-op where CUDA exists")

NO_CUDA = (AssertionError, RuntimeError)  # "Torch not compiled with CUDA enabled" / "no CUDA GPUs"


@pytest.fixture(autouse=True)
def layer_left_applied():
    yield
    cpu_compat.apply()
    assert cpu_compat.applied()


@pytest.fixture
def tracker():
    """megatron's global RNG tracker, its states and seeds put back afterwards."""
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    saved = (dict(tracker.states_), set(tracker.seeds_), tracker._is_initialized)
    yield tracker
    tracker.states_, tracker.seeds_, tracker._is_initialized = saved


def test_cuda_device_calls_fail_without_the_layer_and_map_to_cpu_with_it():
    cpu_compat.restore()
    assert not cpu_compat.applied()
    with pytest.raises(NO_CUDA):
        torch.zeros(2, device="cuda")
    with pytest.raises(NO_CUDA):
        torch.cuda.current_device()
    with pytest.raises(NO_CUDA):
        torch.empty(1).cuda()
    with pytest.raises(NO_CUDA):
        torch.cuda.synchronize()

    cpu_compat.apply()
    assert cpu_compat.applied()
    zeros = torch.zeros(2, device="cuda")
    assert zeros.device.type == "cpu" and torch.equal(zeros, torch.zeros(2))
    assert torch.ones(3, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.cuda.current_device() == "cpu"
    assert torch.empty(4, device=torch.cuda.current_device()).device.type == "cpu"
    tensor = torch.empty(1)
    assert tensor.cuda() is tensor
    assert tensor.to("cuda").device.type == "cpu"
    torch.cuda.synchronize()  # a no-op
    cpu_compat.apply()  # idempotent
    assert cpu_compat.applied()


def test_rng_tracker_needs_the_layer_and_fork_restores_the_outer_cpu_stream(tracker):
    cpu_compat.restore()
    tracker.reset()
    with pytest.raises(NO_CUDA):
        tracker.add("cpu-compat-test", 4321)  # reads torch.cuda.get_rng_state()

    cpu_compat.apply()
    torch.manual_seed(7)
    expected = torch.rand(6)  # the outer stream, with no tracker involved

    torch.manual_seed(7)
    tracker.reset()
    tracker.add("cpu-compat-test", 4321)  # seeds its own state, leaves the outer stream alone
    before = torch.rand(3)
    with tracker.fork("cpu-compat-test"):
        inside = torch.rand(5)
    after = torch.rand(3)
    assert torch.equal(torch.cat([before, after]), expected)
    # inside the fork: the stream seeded by add(), and it advances from one fork to the next
    seeded = torch.Generator().manual_seed(4321)
    assert torch.equal(inside, torch.rand(5, generator=seeded))
    with tracker.fork("cpu-compat-test"):
        again = torch.rand(5)
    assert torch.equal(again, torch.rand(5, generator=seeded))
    assert not torch.equal(again, inside)


# megatron-core 0.16.1's CPU-run warnings, verbatim, with the module that emits each.
MEGATRON_CPU_WARNINGS = [
    (
        "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
        "megatron.core.optimizer",
    ),
    *(
        (
            "Transformer Engine and Apex are not installed. Falling back to local implementations of "
            "multi_tensor_applier and multi_tensor_scale",
            module,
        )
        for module in (
            "megatron.core.optimizer.optimizer",
            "megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision",
        )
    ),
    (
        "Transformer Engine and Apex are not installed. Falling back to local implementations of "
        "multi_tensor_applier, multi_tensor_l2norm, and multi_tensor_scale",
        "megatron.core.optimizer.clip_grads",
    ),
    ("Apex is not installed. Falling back to Torch Norm", "megatron.core.models.backends"),
    ("Apex is not installed. Falling back to Torch Norm", "megatron.core.models.gpt.gpt_layer_specs"),
    *(
        (
            f"When using {what} it is recommended to set the environment variable "
            "CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup",
            "megatron.core.tensor_parallel.layers",
        )
        for what in ("sequence parallelism", "async grad allreduce")
    ),
]


def test_apply_ignores_megatrons_known_cpu_warnings_and_nothing_else():
    from megatron.core.transformer import TransformerConfig

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cpu_compat.apply()
        for message, module in MEGATRON_CPU_WARNINGS:
            warnings.warn_explicit(message, UserWarning, "megatron.py", 1, module=module)
        TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)  # "full scope is deprecated"
        assert [str(w.message) for w in caught if w.category is UserWarning] == []

        caught.clear()
        shown = [
            (
                "Apex is not installed. Falling back to something new",
                UserWarning,
                "megatron.core.models.backends",
            ),
            (
                "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
                UserWarning,
                "elsewhere",
            ),
            (
                "Apex is not installed. Falling back to Torch Norm",
                DeprecationWarning,
                "megatron.core.models.backends",
            ),
            ("an unrelated warning", UserWarning, "megatron.core.tensor_parallel.layers"),
        ]
        for message, category, module in shown:
            warnings.warn_explicit(message, category, "megatron.py", 1, module=module)
        assert [(str(w.message), w.category) for w in caught] == [(m, c) for m, c, _ in shown]


def test_checkpoint_writes_fork_no_process_with_the_layer(tmp_path, monkeypatch):
    """megatron's file writer forks one child per bucket; a child forked from a gloo rank can hang on a lock
    no thread of it will release, so on CPU the layer writes the buckets in the process itself."""
    import multiprocessing

    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    forked = []
    fork = multiprocessing.get_context("fork")
    monkeypatch.setattr(type(fork.Process()), "start", lambda self: forked.append(self) or 1 / 0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        weight = torch.arange(12.0).reshape(3, 4)

        def state() -> dict:
            return {"w": ShardedTensor.from_rank_offsets("w", weight.clone(), replica_id=0)}

        from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

        with monkeypatch.context() as undo:  # megatron's own writer back, the rest of the layer kept
            undo.setattr(
                FileSystemWriterAsync, "write_preloaded_data_multiproc", cpu_compat._saved["write_multiproc"]
            )
            (tmp_path / "without").mkdir()
            with pytest.raises(Exception):  # noqa: B017 (the fork is refused, whatever megatron wraps it in)
                dist_checkpointing.save(state(), str(tmp_path / "without"))
        assert forked, "megatron's writer forks a process per bucket"
        forked.clear()
        (tmp_path / "with").mkdir()
        dist_checkpointing.save(state(), str(tmp_path / "with"))
        loaded = dist_checkpointing.load(
            {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(3, 4), replica_id=0)},
            str(tmp_path / "with"),
        )
        assert not forked and torch.equal(loaded["w"], weight)
    finally:
        dist.destroy_process_group()


def test_megatron_is_imported_without_loading_torch_inductor():
    """megatron-core wraps its fused kernels in `torch.compile` at import; a fresh process that imports it
    plainly loads TorchInductor, one that imports it through `apply()` does not, and gets `torch.compile`
    back unchanged."""
    import subprocess
    import sys

    probe = (
        "import sys, torch\n"
        "compile_ = torch.compile\n"
        "{how}\n"
        "import megatron.core.jit as jit\n"
        "print('torch._inductor.compile_fx' in sys.modules, jit.jit_fuser is compile_, torch.compile is compile_)\n"
    )

    def run(how: str) -> str:
        done = subprocess.run(
            [sys.executable, "-W", "ignore", "-c", probe.format(how=how)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.split()

    assert run("import megatron.core") == ["True", "True", "True"]
    assert run("from parallel import cpu_compat; cpu_compat.apply()") == ["False", "False", "True"]
