"""python -m zoo inspect: parameter counts from params.json / config.json alone, checked against published counts."""
import json
import subprocess
import sys

import pytest

from zoo.__main__ import count, weight_bytes
from zoo.loader import build_empty

PUBLISHED = {  # Meta's params.json of each, and its published parameter count
    "llama-2-7b": ({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
                    "vocab_size": -1}, 6_738_415_616),
    "llama-2-70b": ({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
                     "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}, 68_976_648_192),
    "llama-3.1-8b": ({"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                      "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "norm_eps": 1e-05, "rope_theta": 500000.0,
                      "use_scaled_rope": True}, 8_030_261_248),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_from_params_json_alone(name, tmp_path):
    params, published = PUBLISHED[name]
    (tmp_path / "params.json").write_text(json.dumps(params))
    model = build_empty(tmp_path)  # no weights, no tokenizer: the meta device
    assert count(model) == published
    sizes = weight_bytes(model)
    assert sizes["bfloat16"] == 2 * published and sizes["int8"] < 0.55 * sizes["bfloat16"]


def test_inspect_command_prints_tree_and_hook_points(tiny_dir):
    r = subprocess.run([sys.executable, "-m", "zoo", "inspect", str(tiny_dir), "--prompt", "The for statement"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "total parameters:" in r.stdout and "int4 (group 128)" in r.stdout
    assert "blocks.5.resid_post" in r.stdout and "blocks.0.pattern" in r.stdout
