"""`distillery eval` of a checkpoint imported at tp 2 (`distillery launch --nproc 2 -- import`): it
scores like the HF model it came from."""

import math

from tests.helpers import distillery


def test_a_tensor_parallel_checkpoint_scores_like_its_hf_model(tmp_path, prepared_small, tiny_model_dir):
    from distill.atomic import read_json

    imported = distillery(
        "launch", "--nproc", "2", "--", "import", tiny_model_dir, tmp_path / "ckpt", "--tp", "2", timeout=300
    )
    assert imported.returncode == 0, imported.stderr
    data = prepared_small["data"]["dir"]
    result = distillery(
        "eval",
        "--data",
        data,
        f"hf={tiny_model_dir}",
        f"tp2={tmp_path / 'ckpt'}",
        "--out",
        tmp_path / "e",
        "--quiet",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    models = read_json(tmp_path / "e" / "eval.json")["models"]
    for domain, scores in models["hf"]["domains"].items():
        assert math.isclose(models["tp2"]["domains"][domain]["ce"], scores["ce"], rel_tol=1e-5)
