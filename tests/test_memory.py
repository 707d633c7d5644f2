"""The README's loading-memory claims, measured on a 31 M-parameter LLaMA in a fresh process.

zoo.load casts the weights to the target dtype tensor by tensor, a chunk at a time, never holding a
full copy in the stored dtype, and gives back the pages of Meta's mmap'd .pth files as it copies
them. Measured as benchmarks/load_memory.py does: (peak RSS - RSS before the load) / the loaded
model's bytes. The 1.1B benchmark gives 1.03-1.09; on this small model glibc's heap keeps up to
~30 MB of freed temporaries, so 1.15-1.55 was measured. The bound is 2: holding the model twice
(a full bf16 copy) or once more in fp32 (2x its bf16 bytes, 3 in all), or keeping every mapped
page of a .pth (+1), goes over it.
"""
import json
import subprocess
import sys

import pytest
import torch
from helpers import save_meta
from safetensors.torch import save_file

import zoo

MEASURE = r"""
import sys, torch, zoo
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
base = status("VmRSS")
model = zoo.load(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
peak = status("VmHWM")
size = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
print((peak - base) / size)
"""
DIM, HIDDEN, LAYERS, VOCAB = 512, 1536, 8, 4000  # 31 M parameters: 124 MB in fp32, no tensor over 8 MB


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The same random weights as an fp32 HF safetensors file and a bf16 Meta .pth."""
    hf = tmp_path_factory.mktemp("hf-fp32")
    (hf / "config.json").write_text(json.dumps(dict(
        model_type="llama", vocab_size=VOCAB, hidden_size=DIM, intermediate_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=8, max_position_embeddings=256, rms_norm_eps=1e-5)))
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (VOCAB, DIM), "lm_head.weight": (VOCAB, DIM), "model.norm.weight": (DIM,)}
    for i in range(LAYERS):
        shapes.update({f"model.layers.{i}.self_attn.{p}_proj.weight": (DIM, DIM) for p in "qkvo"})
        shapes.update({f"model.layers.{i}.mlp.{p}_proj.weight": (HIDDEN, DIM) for p in ("gate", "up")})
        shapes.update({f"model.layers.{i}.mlp.down_proj.weight": (DIM, HIDDEN),
                       f"model.layers.{i}.input_layernorm.weight": (DIM,),
                       f"model.layers.{i}.post_attention_layernorm.weight": (DIM,)})
    save_file({k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}, hf / "model.safetensors")
    meta = save_meta(zoo.load(hf, dtype=torch.bfloat16), tmp_path_factory.mktemp("meta-bf16"))
    return {"hf-fp32": hf, "meta-bf16": meta}


@pytest.mark.parametrize("layout", ["hf-fp32", "meta-bf16"])
def test_load_to_bf16_holds_the_model_about_once(checkpoints, layout):
    r = subprocess.run([sys.executable, "-c", MEASURE, str(checkpoints[layout]), "bfloat16"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ratio = float(r.stdout)
    assert 1.0 <= ratio < 2.0, f"{layout}: peak RSS growth {ratio:.2f}x the loaded model"
