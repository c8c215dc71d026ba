"""The GPU bundle's checker (`scripts/gpu/bundle_check.py`, docs/gpu.md): which wheels install on the GPU
image, a bundle refused for two versions of a project or its size. The bundle itself and the check
rehearsed on CPU: tests/e2e/test_gpu_kit.py.
"""

import sys

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "scripts" / "gpu"))
from bundle_check import check_bundle, wheel_problem


def test_wheel_tags_are_checked_for_cpython_312_on_linux_x86_64():
    assert (
        wheel_problem("megatron_core-0.16.1-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl")
        is None
    )
    assert wheel_problem("deepspeed-0.19.8-py3-none-any.whl") is None
    assert (
        wheel_problem("pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl")
        is None
    )
    assert "do not install" in wheel_problem("pydantic_core-2.50.5-cp311-cp311-manylinux_2_17_x86_64.whl")
    assert "do not install" in wheel_problem("pydantic_core-2.50.5-cp312-cp312-macosx_11_0_arm64.whl")
    assert "do not install" in wheel_problem("pydantic_core-2.50.5-cp312-cp312-manylinux_2_17_aarch64.whl")
    assert "not a wheel" in wheel_problem("deepspeed-0.19.8.tar.gz")


def test_a_bundle_with_two_versions_of_a_project_or_too_large_is_refused(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "hjson-3.1.0-py3-none-any.whl").write_bytes(b"x")
    (wheels / "hjson-3.0.0-py3-none-any.whl").write_bytes(b"x")
    (tmp_path / "demo.bin").write_bytes(b"\0" * (2 << 20))
    _, problems = check_bundle(tmp_path, max_mib=1.0)
    assert any("two versions of hjson" in p for p in problems)
    assert any("over the 1 MiB" in p for p in problems)
