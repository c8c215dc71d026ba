"""What the GPU path needs and a CPU test can pin (the GPU check, scripts/gpu_check.sh, does the rest).

gloo accepts CPU tensors in collectives where NCCL needs them on the rank's GPU; `torch.cuda` calls
fail on a machine without CUDA, and megatron-core's CPU layer (`parallel/cpu_compat.py`) turns some of
them into no-ops, so a CPU run would not notice ours. These checks read the code itself.
"""

import ast

import torch
import torch.distributed as dist

from parallel import distributed
from tests.helpers import REPO

SOURCES = [
    p for package in ("distill", "parallel", "launcher") for p in sorted((REPO / package).rglob("*.py"))
]
FACTORIES = {"tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint", "linspace"}
# tensors deliberately made on the host (file, function): each is moved to the device, or stays host-side
HOST_SIDE = {
    (
        "distill/engine/megatron/optimizer.py",
        "_init_state",
    ): "torch AdamW keeps `step` on the CPU (not capturable)",
    ("distill/engine/megatron/optimizer.py", "load_state_dict"): "the same `step`",
    ("distill/teacher/aligned.py", "vocab_match"): "built once on the host, then `.to(device)`",
    ("distill/teacher/aligned.py", "vocab_projection"): "built once on the host, then `.to(device)`",
    ("distill/eval/score.py", "score_windows"): "a padded batch built row by row, then `.to(device)`",
    ("distill/cache/writer.py", "_records"): "uniforms from a per-sequence CPU generator, then `.to(device)`",
    ("distill/prune/cut.py", "_rows"): "indices into the teacher's CPU tensors (one process, no collective)",
    ("distill/prune/cut.py", "cut_state_dict"): "the same: the cut runs on the host",
    (
        "distill/prune/importance.py",
        "__init__",
    ): "float64 sums kept on the host, moved to the device to reduce",
}


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _innermost_function(tree: ast.AST, line: int) -> ast.FunctionDef | None:
    found = None
    for fn in _functions(tree):
        if fn.lineno <= line <= (fn.end_lineno or fn.lineno) and (found is None or fn.lineno > found.lineno):
            found = fn
    return found


def _torch_calls(tree: ast.AST, prefix: str):
    """Calls `torch.<prefix>.<name>(...)` (prefix "" for `torch.<name>`) as (node, name)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = ast.unparse(node.func.value)
            if owner == ("torch" if not prefix else f"torch.{prefix}"):
                yield node, node.func.attr


def test_every_tensor_factory_in_the_code_names_its_device_or_is_host_side_by_design():
    undeclared = []
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for call, name in _torch_calls(tree, ""):
            if name not in FACTORIES or any(k.arg == "device" for k in call.keywords):
                continue
            fn = _innermost_function(tree, call.lineno)
            key = (str(path.relative_to(REPO)), fn.name if fn else "<module>")
            if key not in HOST_SIDE:
                undeclared.append(f"{key[0]}:{call.lineno} in {key[1]}: {ast.unparse(call)}")
    assert not undeclared, "tensors made without a device (NCCL needs the rank's GPU):\n" + "\n".join(
        undeclared
    )


def _mentions_cuda(node: ast.AST) -> bool:
    return "cuda" in ast.unparse(node)


def _guarded(tree: ast.AST, call: ast.Call) -> bool:
    """Inside an `if` / conditional expression / `and` that tests for CUDA, or after an early return
    (or raise) on such a test in the same function."""
    for node in ast.walk(tree):
        if isinstance(node, ast.If | ast.IfExp) and _mentions_cuda(node.test):
            body = node.body if isinstance(node, ast.If) else [node.body]
            for part in body:
                if any(inner is call for inner in ast.walk(part)):
                    return True
        if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.And):
            first, *rest = node.values
            if _mentions_cuda(first) and any(inner is call for part in rest for inner in ast.walk(part)):
                return True
    fn = _innermost_function(tree, call.lineno)
    for statement in ast.walk(fn) if fn else []:
        if (
            isinstance(statement, ast.If)
            and statement.lineno < call.lineno
            and _mentions_cuda(statement.test)
            and isinstance(statement.body[-1], ast.Return | ast.Raise)
        ):
            return True
    return False


def test_torch_cuda_is_called_only_where_cuda_is_present():
    unguarded = []
    for path in SOURCES:
        if path.name == "cpu_compat.py":  # the CPU layer that replaces these functions
            continue
        tree = ast.parse(path.read_text())
        for call, name in _torch_calls(tree, "cuda"):
            if name != "is_available" and not _guarded(tree, call):
                unguarded.append(f"{path.relative_to(REPO)}:{call.lineno}: {ast.unparse(call)}")
    assert not unguarded, "torch.cuda calls that a CPU run would reach:\n" + "\n".join(unguarded)


def test_the_guard_check_sees_an_unguarded_call():
    tree = ast.parse("import torch\ndef f(d):\n    torch.cuda.synchronize()\n")
    call = next(c for c, _ in _torch_calls(tree, "cuda"))
    assert not _guarded(tree, call)
    tree = ast.parse(
        "import torch\ndef f(d):\n    if d.type != 'cuda':\n        return\n    torch.cuda.synchronize()\n"
    )
    assert _guarded(tree, next(c for c, _ in _torch_calls(tree, "cuda")))


def test_join_world_sets_the_cuda_device_before_it_starts_the_process_group(monkeypatch):
    calls = []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    device = distributed.join_world()
    assert calls == [("set_device", 1), ("init", "nccl")]
    assert device == torch.device("cuda", 1)


class _Reader:
    """What CachedSource reads from a cache: one micro-batch's tensors."""

    directory, mode = "cache", "topk"
    manifest = {"spec": {"teacher_vocab_size": 16}}

    def batch(self, keys):
        return {"ids": torch.zeros(len(keys), 4, 2, dtype=torch.int64), "tail": torch.zeros(len(keys), 4)}


def test_the_cache_read_ahead_pins_host_memory_on_cuda_only(monkeypatch):
    from distill.teacher.cached import CachedSource

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self.shape) or self)
    keys = [[("code", "train", 0), ("code", "train", 1)]]
    on_cpu = CachedSource(_Reader(), active=True, device=torch.device("cpu"))
    on_cpu._read(keys)
    assert pinned == []  # pinning needs a CUDA driver; on CPU the copy is a no-op anyway
    on_gpu = CachedSource(_Reader(), active=True, device=torch.device("cuda", 0))
    on_gpu._read(keys)
    assert pinned == [torch.Size([2, 4, 2]), torch.Size([2, 4])]  # in the read-ahead thread, before use
    on_cpu.close()
    on_gpu.close()
