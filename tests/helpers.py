"""Tiny checkpoints written by the tests themselves, in Hugging Face and Meta layouts; run.py in-process."""
import contextlib
import functools
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import transformers  # a required test dependency: a failed import fails the run, never skips it

from zoo.models import llama

# A LLaMA small enough to run in milliseconds, big enough to have every part (GQA groups, two layers).
SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5)

# The configurations the parity tests cover, as Hugging Face LlamaConfig keyword arguments.
LLAMA_VARIANTS = {
    "llama2-mha": {},
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "llama3-rope-scaling": dict(num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=512,
                                rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                  high_freq_factor=4.0, original_max_position_embeddings=32)),
    "linear-rope-scaling": dict(rope_scaling=dict(rope_type="linear", factor=2.0)),
    "tied-embeddings": dict(tie_word_embeddings=True),
    "head-dim-and-bias": dict(head_dim=32, attention_bias=True, mlp_bias=True),
}


def hf_llama(variant: str = "llama2-mha", seed: int = 0, **overrides):
    """A Hugging Face LlamaForCausalLM with random weights: std 0.15 (norm weights 1 +- 0.1), so logits are far from uniform."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**SMALL, **LLAMA_VARIANTS[variant], **overrides})
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.15)
    return model


def save_hf(model, directory: Path, **kwargs) -> Path:
    """save_pretrained (safetensors by default; safe_serialization=False for pytorch_model.bin)."""
    model.save_pretrained(directory, **kwargs)
    return directory


def save_hf_bin(model, directory: Path, shards: int = 1) -> Path:
    """The older pytorch_model.bin layout (transformers 5 no longer writes it): one file, or several + index."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return directory
    keys, weight_map = list(state), {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = keys[i::shards]
        torch.save({k: state[k] for k in part}, directory / name)
        weight_map.update({k: name for k in part})
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


# Meta's key for each zoo parameter, written here from Meta's llama/model.py and the converter's key map
# (../shared/ARCHITECTURES.md, section 2), not from zoo's own table: a wrong row in
# zoo.models.llama.META_NAMES (w1 and w3 swapped, say) must fail the tests that load these files.
# Meta's feed-forward is w2(silu(w1 x) * w3 x): w1 is the gate, w3 the up projection, w2 the down one.
META_KEYS = {
    "embed.weight": "tok_embeddings.weight",
    "blocks.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "blocks.{i}.attn.wq.weight": "layers.{i}.attention.wq.weight",
    "blocks.{i}.attn.wk.weight": "layers.{i}.attention.wk.weight",
    "blocks.{i}.attn.wv.weight": "layers.{i}.attention.wv.weight",
    "blocks.{i}.attn.wo.weight": "layers.{i}.attention.wo.weight",
    "blocks.{i}.mlp_norm.weight": "layers.{i}.ffn_norm.weight",
    "blocks.{i}.mlp.w_gate.weight": "layers.{i}.feed_forward.w1.weight",
    "blocks.{i}.mlp.w_in.weight": "layers.{i}.feed_forward.w3.weight",
    "blocks.{i}.mlp.w_out.weight": "layers.{i}.feed_forward.w2.weight",
    "norm.weight": "norm.weight",
    "output.weight": "output.weight",
}


def meta_key(name: str) -> str:
    """Meta's checkpoint key for a zoo LLaMA parameter name (META_KEYS)."""
    layer = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    return META_KEYS[f"blocks.{{i}}.{layer[2]}"].format(i=layer[1]) if layer else META_KEYS[name]


# How Meta's fairscale layers split each weight across model-parallel ranks (the checkpoint layout).
def meta_split_dim(meta_key: str, vocab_parallel: bool) -> int | None:
    if meta_key.startswith("tok_embeddings"):
        return 0 if vocab_parallel else 1
    if any(f".{w}." in meta_key for w in ("wq", "wk", "wv", "w1", "w3")) or meta_key.startswith("output"):
        return 0
    if any(f".{w}." in meta_key for w in ("wo", "w2")):
        return 1
    return None  # norms: replicated


def save_meta(model: llama.Llama, directory: Path, shards: int = 1, vocab_parallel: bool = False,
              tokenizer: Path | None = None) -> Path:
    """Write a zoo LLaMA in Meta's layout: params.json + consolidated.NN.pth, split over `shards` ranks.

    Keys come from META_KEYS (not zoo's table); every shard also holds LLaMA 1/2's `rope.freqs`
    table, which a loader must ignore.
    """
    cfg = model.config
    directory.mkdir(parents=True, exist_ok=True)
    # params.json has no hidden size: find the multiple_of that Meta's rule turns into ours
    multiple_of = next(m for m in (2 ** i for i in range(13))
                       if llama.LlamaConfig(dim=cfg.dim, n_heads=cfg.n_heads, multiple_of=m).hidden_dim == cfg.hidden_dim)
    params = dict(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                  vocab_size=cfg.vocab_size, multiple_of=multiple_of, norm_eps=cfg.norm_eps,
                  rope_theta=cfg.rope_theta, max_seq_len=cfg.max_seq_len)
    (directory / "params.json").write_text(json.dumps(params))
    state = {meta_key(k): v for k, v in model.state_dict().items()}
    rope_freqs = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
    for rank in range(shards):
        part = {"rope.freqs": rope_freqs.clone()}
        for key, t in state.items():
            dim = meta_split_dim(key, vocab_parallel)
            part[key] = (t if dim is None else t.chunk(shards, dim=dim)[rank]).clone()
        torch.save(part, directory / f"consolidated.{rank:02d}.pth")
    if tokenizer is not None:
        (directory / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return directory


def spawn(fn, world: int = 2, *args) -> None:
    """Run fn(rank, *args) in `world` processes joined by gloo, as torchrun would start them."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(world, port, fn, args), nprocs=world, join=True)


def _worker(rank: int, world: int, port: int, fn, args) -> None:
    import os

    import torch.distributed as dist

    import zoo.parallel
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    zoo.parallel.setup()
    fn(rank, *args)
    dist.barrier()  # nobody tears the group down while another rank still uses it
    dist.destroy_process_group()


def spawn_checks(checks: dict[str, tuple], world: int, out: Path) -> None:
    """Several checks in one group of `world` ranks, started once: checks = {name: (fn, args)}, each
    fn(rank, *args) run in turn on every rank. Each rank writes out/{name}.{rank}: "ok" or the
    traceback; `check_outcome` then passes or fails the test that owns the check. A rank stops at its
    first failure (spawn ends the others), so a later check is reported as not run, never as passed.
    """
    try:
        spawn(_run_checks, world, checks, out)
    except Exception as e:  # the outcome files say which check failed and how; keep the rest for 'not run'
        (out / "spawn-error").write_text(str(e))


def _run_checks(rank: int, checks: dict[str, tuple], out: Path) -> None:
    import traceback
    for name, (fn, args) in checks.items():
        try:
            fn(rank, *args)
        except BaseException:
            (out / f"{name}.{rank}").write_text(traceback.format_exc())
            raise
        (out / f"{name}.{rank}").write_text("ok")


def check_outcome(out: Path, name: str, world: int) -> None:
    """Fail the calling test if check `name` of a `spawn_checks` run failed on any rank, or did not run."""
    import pytest
    for rank in range(world):
        path = out / f"{name}.{rank}"
        if not path.exists():
            error = (out / "spawn-error").read_text() if (out / "spawn-error").exists() else "no error reported"
            pytest.fail(f"check {name!r} did not run on rank {rank}: an earlier one in the same worker failed "
                        f"({error.strip()[-2000:]})", pytrace=False)
        if path.read_text() != "ok":
            pytest.fail(f"check {name!r} failed on rank {rank}:\n{path.read_text()}", pytrace=False)


# OPT, GPT-NeoX, GPT-2, Qwen2, Qwen3, Mistral, Gemma and Gemma 2 variants, as Hugging Face config keyword arguments.
FAMILY_VARIANTS = {
    "opt-pre-ln": ("opt", dict()),
    "opt-post-ln-proj": ("opt", dict(do_layer_norm_before=False, word_embed_proj_dim=32)),
    "neox-rotary-0.25-parallel": ("gpt_neox", dict(rotary_pct=0.25)),
    "neox-rotary-1.0-sequential": ("gpt_neox", dict(rotary_pct=1.0, use_parallel_residual=False)),
    "gpt2": ("gpt2", dict()),
    # (windows of 6 keys: every test's sequences run past them; Qwen2's on layer 1 only, by max_window_layers)
    "qwen2-gqa-tied-window-layer-1": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True,
                                                    use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "qwen3-head-dim-32-bias": ("qwen3", dict(num_key_value_heads=2, head_dim=32, attention_bias=True)),
    "mistral-gqa-window-6": ("mistral", dict(num_key_value_heads=2, sliding_window=6)),
    "gemma-gqa-head-dim-32": ("gemma", dict(num_key_value_heads=2, head_dim=32)),  # (MQA, as Gemma 2B: test_families_gemma)
    # (layer 0 sliding, layer 1 full, transformers' rule; caps low enough to bend these random weights' values)
    "gemma2-window-6-softcaps": ("gemma2", dict(num_key_value_heads=2, head_dim=32, sliding_window=6,
                                                query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                                                final_logit_softcapping=3.0)),
}


FAMILY_SMALL = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
GPT2_SMALL = dict(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=128, n_inner=160, bos_token_id=0,
                  eos_token_id=0)  # GPT2Config's own names; its default ids (50256) lie past this vocabulary


# Each family's Hugging Face config and model classes, and its small config's keyword arguments.
HF_CLASSES = {
    "opt": ("OPTConfig", "OPTForCausalLM", {**FAMILY_SMALL, "ffn_dim": 160}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", GPT2_SMALL),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {**FAMILY_SMALL, "intermediate_size": 160}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**FAMILY_SMALL, "intermediate_size": 160}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**FAMILY_SMALL, "intermediate_size": 160, "head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**FAMILY_SMALL, "intermediate_size": 160}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**FAMILY_SMALL, "intermediate_size": 160, "head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**FAMILY_SMALL, "intermediate_size": 160, "head_dim": 16}),
}


def hf_family(variant: str, seed: int = 0, **more):
    """A Hugging Face model of one of FAMILY_VARIANTS (HF_CLASSES) with random weights (as `hf_llama`)."""
    family, overrides = FAMILY_VARIANTS[variant]
    config_class, model_class, small = HF_CLASSES[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_class)(**{**small, **overrides, **more})
    model = getattr(transformers, model_class)(cfg)
    unit = 0.0 if family.startswith("gemma") else 1.0  # Gemma's norms scale by 1 + weight
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(unit, 0.1) if "norm" in name or ".ln_" in name else p.normal_(0.0, 0.15)
    return model.eval()


@functools.cache
def run_py_module():
    """The repository's run.py, imported as a module."""
    spec = importlib.util.spec_from_file_location("run_py", Path(__file__).resolve().parent.parent / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_py(*argv: str, stdin: str = "") -> tuple[int, str, str]:
    """run.py's main(argv) in this process, reading `stdin`: (exit status, stdout, stderr).

    What a subprocess would print, without its second or two of importing torch.
    """
    out, err, saved = io.StringIO(), io.StringIO(), sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = run_py_module().main(list(argv))
    finally:
        sys.stdin = saved
    return status, out.getvalue(), err.getvalue()


def torchrun(*argv: str, nproc: int = 2, stdin: str | None = None) -> subprocess.CompletedProcess:
    """run.py under torchrun, `nproc` ranks on this machine (one thread each), `stdin` piped in (rank 0 reads it)."""
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(root / "run.py"), *argv]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=300, cwd=root,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
