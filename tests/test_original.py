"""gpt-neox (DeepSpeed) and metaseq (OPT) checkpoints, written here from a Hugging Face model by the
inverse of the known conversions (our own tables below, not zoo's), must give the HF model's logits."""
import argparse
import json
import sys
import types
from enum import Enum

import numpy as np
import pytest
import torch
from helpers import hf_family, run_py, spawn

import zoo
from zoo.formats.files import load_training_checkpoint, plain

FP32_TOL = 1e-4
TOKENS = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(3))


# ---- writing gpt-neox's layout -------------------------------------------------------------------
# Within a block gpt-neox's keys are HF's. Column-parallel: split on dim 0; row-parallel weights on
# dim 1; row-parallel biases: with the parallel residual every rank adds its own copy before the
# all-reduce (so the copies sum to the model's bias), with the sequential one they are replicated.
NEOX_COLUMN = ("attention.query_key_value.weight", "attention.query_key_value.bias", "mlp.dense_h_to_4h.weight",
               "mlp.dense_h_to_4h.bias")
NEOX_ROW = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")
NEOX_ROW_BIAS = ("attention.dense.bias", "mlp.dense_4h_to_h.bias")
NEOX_NORMS = ("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
              "post_attention_layernorm.bias")


def neox_ranks(hf, mp: int, linear12: bool = False) -> list[dict[int, dict[str, torch.Tensor]]]:
    """Per model-parallel rank: {layer index: {key: tensor}} as gpt-neox's training holds them."""
    sd, cfg, g = hf.state_dict(), hf.config, torch.Generator().manual_seed(0)
    n = cfg.num_hidden_layers
    ranks = [{} for _ in range(mp)]

    def put(idx, key, pieces):
        if linear12:  # newer gpt-neox names
            key = key.replace("mlp.dense_h_to_4h", "mlp.linear1").replace("mlp.dense_4h_to_h", "mlp.linear2")
        for r in range(mp):
            ranks[r].setdefault(idx, {})[key] = pieces[r].clone()

    def replicas(t, scale):  # copies that average (or sum) to t but differ, so that taking one rank's is wrong
        noise = [scale * torch.randn(t.shape, generator=g) for _ in range(mp - 1)]
        return noise + [t - sum(noise)] if mp > 1 else [t]

    put(0, "word_embeddings.weight", sd["gpt_neox.embed_in.weight"].chunk(mp, 0))
    for i in range(n):
        layer = lambda key: sd[f"gpt_neox.layers.{i}.{key}"]  # noqa: E731
        for key in NEOX_COLUMN:
            put(i + 2, key, layer(key).chunk(mp, 0))
        for key in NEOX_ROW:
            put(i + 2, key, layer(key).chunk(mp, 1))
        for key in NEOX_ROW_BIAS:
            put(i + 2, key, replicas(layer(key), 1.0) if cfg.use_parallel_residual else [layer(key)] * mp)
        for key in NEOX_NORMS:  # replicated; averaged when merged
            put(i + 2, key, [c * mp for c in replicas(layer(key), 0.01)])
        put(i + 2, "attention.rotary_emb.inv_freq", [torch.arange(4.0)] * mp)  # a buffer, ignored
    put(n + 3, "norm.weight", [sd["gpt_neox.final_layer_norm.weight"]] * mp)
    put(n + 3, "norm.bias", [sd["gpt_neox.final_layer_norm.bias"]] * mp)
    if cfg.tie_word_embeddings:  # DeepSpeed's tied output layer holds the embedding again
        put(n + 4, "word_embeddings.weight", sd["gpt_neox.embed_in.weight"].chunk(mp, 0))
    else:
        out = sd["embed_out.weight"] if "embed_out.weight" in sd else sd["lm_head.weight"]  # transformers 5 renamed it
        put(n + 4, "final_linear.weight", out.chunk(mp, 0))
    return ranks


def neox_yaml(hf, mp: int, **changes) -> str:
    """The model part of a gpt-neox config, in its JSON-like YAML style (comments, trailing commas)."""
    cfg = hf.config
    rope = getattr(cfg, "rope_parameters", None) or {}  # transformers 5 keeps the rotary settings here
    rotary_pct = rope.get("partial_rotary_factor", getattr(cfg, "rotary_pct", None))
    base = rope.get("rope_theta", getattr(cfg, "rotary_emb_base", None))
    args = {"pipe-parallel-size": 1, "model-parallel-size": mp, "num-layers": cfg.num_hidden_layers,
            "hidden-size": cfg.hidden_size, "num-attention-heads": cfg.num_attention_heads,
            "seq-length": cfg.max_position_embeddings, "max-position-embeddings": cfg.max_position_embeddings,
            "pos-emb": "rotary", "rotary-pct": rotary_pct, "rotary-emb-base": base,
            "norm": "layernorm", "layernorm-epsilon": cfg.layer_norm_eps, "gpt-j-residual": cfg.use_parallel_residual,
            "no-weight-tying": not cfg.tie_word_embeddings, "attention-config": [[["global"], cfg.num_hidden_layers]],
            "fp16": {"enabled": True}}
    args.update(changes)
    return "# GPT-NeoX model config\n{\n" + "".join(f"  {json.dumps(k)}: {json.dumps(v)},\n" for k, v in args.items()) + "}\n"


def save_neox(hf, directory, mp: int = 1, pipeline: bool = True, linear12: bool = False, step: str | None = None,
              **yaml_changes):
    """gpt-neox's layout: the pipeline one (a file per layer and rank) or the sequential one (a file per rank)."""
    where = directory / step if step else directory
    (where / "configs").mkdir(parents=True)
    (where / "configs" / "model.yml").write_text(neox_yaml(hf, mp, **yaml_changes))
    for r, layers in enumerate(neox_ranks(hf, mp, linear12)):
        extras = {"checkpoint_version": 3.0, "iteration": 10, "np_rng_state": np.random.get_state(),
                  "args": argparse.Namespace(num_layers=hf.config.num_hidden_layers)}  # not weights_only-loadable
        if pipeline:
            for idx, tensors in layers.items():
                torch.save(tensors, where / f"layer_{idx:02d}-model_{r:02d}-model_states.pt")
            torch.save({"module": None, **extras}, where / f"mp_rank_{r:02d}_model_states.pt")
        else:
            module = {f"sequential.{idx}.{k}": t for idx, tensors in layers.items() for k, t in tensors.items()}
            torch.save({"module": module, **extras}, where / f"mp_rank_{r:02d}_model_states.pt")
    if step:
        (directory / "latest").write_text(step)
    return directory


NEOX_CASES = {  # name: (HF variant and overrides, model-parallel size, pipeline layout, linear1/2 names, global_step dir)
    "pipeline-mp2-parallel-residual": (("neox-rotary-0.25-parallel", {}), 2, True, False, "global_step10"),
    "sequential-mp2-sequential-residual": (("neox-rotary-1.0-sequential", {}), 2, False, True, None),
    "pipeline-mp1-tied": (("neox-rotary-0.25-parallel", dict(tie_word_embeddings=True)), 1, True, False, None),
}


@pytest.mark.parametrize("case", sorted(NEOX_CASES))
def test_neox_checkpoint_matches_hf(case, tmp_path):
    (variant, overrides), mp, pipeline, linear12, step = NEOX_CASES[case]
    hf = hf_family(variant, **overrides)
    directory = save_neox(hf, tmp_path, mp, pipeline, linear12, step)
    model = zoo.load(directory, dtype=torch.float32)
    with torch.no_grad():
        want, got = hf(TOKENS).logits, model(TOKENS)
    assert (got - want).abs().max() < FP32_TOL
    assert want.std() > 0.5
    assert model.config.parallel_residual == hf.config.use_parallel_residual
    assert model.config.rotary_dim == (4 if variant == "neox-rotary-0.25-parallel" else 16)


def test_neox_gpt_j_tied_layer_norm(tmp_path):
    """gpt-j-tied: the parallel-residual block feeds input_layernorm's output to both attention and MLP;
    the stored post_attention_layernorm is never used. The HF reference gets the same by a copy."""
    hf = hf_family("neox-rotary-0.25-parallel")
    directory = save_neox(hf, tmp_path / "tied", mp=2, **{"gpt-j-tied": True})
    with torch.no_grad():
        for layer in hf.gpt_neox.layers:
            layer.post_attention_layernorm.load_state_dict(layer.input_layernorm.state_dict())
        want = hf(TOKENS).logits
    got = zoo.load(directory, dtype=torch.float32)(TOKENS)
    assert (got - want).abs().max() < FP32_TOL


def test_neox_bf16_and_cached_decode(tmp_path):
    """bf16 with the KV cache, from a 2-rank checkpoint: against the fp32 logits, zoo's error is no larger
    than HF's own bf16 error (mean within 10%, max within 25%, as test_families). Measured: mean 0.0082
    against HF's 0.0083, max 0.047 against 0.052, for logits of std 1.7."""
    hf = hf_family("neox-rotary-0.25-parallel")
    directory = save_neox(hf, tmp_path, mp=2)
    model = zoo.load(directory, dtype=torch.bfloat16)
    hf16 = hf_family("neox-rotary-0.25-parallel").to(torch.bfloat16)
    with torch.no_grad():
        exact = hf(TOKENS).logits
        theirs = (hf16(TOKENS).logits.float() - exact).abs()
        cache = model.new_cache(2, TOKENS.shape[1])
        got = torch.cat([model(TOKENS[:, :10], cache=cache)] +
                        [model(TOKENS[:, i : i + 1], cache=cache) for i in range(10, TOKENS.shape[1])], dim=1)
    ours = (got.float() - exact).abs()
    assert model.embed.weight.dtype == torch.bfloat16
    assert ours.mean() <= 1.1 * theirs.mean(), (ours.mean(), theirs.mean())
    assert ours.max() <= 1.25 * theirs.max(), (ours.max(), theirs.max())


# ---- writing metaseq's layout --------------------------------------------------------------------
# HF's keys less "model.", with project_in/out and the top final_layer_norm renamed back; q, k, v
# optionally fused into qkv_proj as [k; v; q] on each rank; Megatron's splits (column dim 0, row dim 1).
METASEQ_NAMES = {"decoder.project_in.": "decoder.project_in_dim.", "decoder.project_out.": "decoder.project_out_dim.",
                 "decoder.final_layer_norm.": "decoder.layer_norm."}


def metaseq_ranks(hf, mp: int, fused: bool) -> list[dict[str, torch.Tensor]]:
    ranks = [{} for _ in range(mp)]
    sd = {k.removeprefix("model."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for key, t in sd.items():
        for hf_name, name in METASEQ_NAMES.items():
            key = name + key.removeprefix(hf_name) if key.startswith(hf_name) else key
        column = key == "decoder.embed_tokens.weight" or any(f".{m}." in key for m in ("q_proj", "k_proj", "v_proj", "fc1"))
        row = key.endswith(("out_proj.weight", "fc2.weight"))
        pieces = t.chunk(mp, 0) if column else t.chunk(mp, 1) if row else [t] * mp
        for r in range(mp):
            ranks[r][key] = pieces[r].clone()
    if fused:
        for r in range(mp):
            for key in [k for k in ranks[r] if ".self_attn.q_proj." in k]:
                k, v, q = (ranks[r].pop(key.replace("q_proj", p)) for p in ("k_proj", "v_proj", "q_proj"))
                ranks[r][key.replace("q_proj", "qkv_proj")] = torch.cat([k, v, q])
    for r in range(mp):
        ranks[r]["decoder.version"] = torch.tensor([3.0])
        ranks[r]["decoder.output_projection.weight"] = ranks[r]["decoder.embed_tokens.weight"].clone()
    return ranks


def metaseq_cfg(hf) -> dict:
    cfg = hf.config
    return {"decoder_layers": cfg.num_hidden_layers, "decoder_embed_dim": cfg.hidden_size,
            "decoder_attention_heads": cfg.num_attention_heads, "decoder_ffn_embed_dim": cfg.ffn_dim,
            "decoder_normalize_before": cfg.do_layer_norm_before, "decoder_learned_pos": True,
            "no_scale_embedding": True, "activation_fn": "relu", "share_decoder_input_output_embed": True}


class Activation(Enum):  # omegaconf stores enum options (metaseq's activation_fn is one) as enum members
    RELU = "relu"


class DictConfig:
    """Pickles as omegaconf's DictConfig does (its state's `_content` holds value nodes with `_val`);
    saved under the module name omegaconf.dictconfig, which is not installed where it is loaded."""

    def __init__(self, content):
        self._content = {k: DictConfig(v) if isinstance(v, dict) else AnyNode(v) for k, v in content.items()}
        self._metadata, self._parent = AnyNode(None), None


class AnyNode:
    def __init__(self, value):
        self._val, self._parent = value, None


def save_with_fake_omegaconf(obj, path):
    fake = types.ModuleType("omegaconf.dictconfig")
    fake.DictConfig, fake.AnyNode = DictConfig, AnyNode
    DictConfig.__module__ = AnyNode.__module__ = "omegaconf.dictconfig"
    sys.modules["omegaconf"] = sys.modules["omegaconf.dictconfig"] = fake
    try:
        torch.save(obj, path)
    finally:
        del sys.modules["omegaconf"], sys.modules["omegaconf.dictconfig"]
        DictConfig.__module__ = AnyNode.__module__ = __name__


def save_metaseq(hf, directory, mp: int, fused: bool, config: str):
    """config: "cfg" (omegaconf, as metaseq), "args" (argparse.Namespace, as older fairseq), "json" (HF's
    config.json beside the files), "none"."""
    directory.mkdir(exist_ok=True)
    for r, tensors in enumerate(metaseq_ranks(hf, mp, fused)):
        path = directory / ("restored.pt" if mp == 1 else f"reshard-model_part-{r}.pt")
        state = {"model": tensors, "optimizer_history": [{"num_updates": 10}]}
        if config == "args":
            torch.save({**state, "args": argparse.Namespace(**metaseq_cfg(hf))}, path)
        elif config == "cfg":
            model_cfg = {**metaseq_cfg(hf), "activation_fn": Activation.RELU}  # an enum, as omegaconf keeps it
            save_with_fake_omegaconf({**state, "cfg": DictConfig({"model": model_cfg, "task": {}})}, path)
        else:
            torch.save(state, path)
    if config == "json":
        hf.config.to_json_file(directory / "config.json")
    return directory


METASEQ_CASES = {  # name: (HF variant, model-parallel size, fused qkv, where the config is)
    "restored-pre-ln-args": ("opt-pre-ln", 1, False, "args"),
    "restored-pre-ln-fused-cfg": ("opt-pre-ln", 1, True, "cfg"),
    "mp2-post-ln-proj-fused-cfg": ("opt-post-ln-proj", 2, True, "cfg"),
    "mp2-pre-ln-config-json": ("opt-pre-ln", 2, False, "json"),
}


@pytest.mark.parametrize("case", sorted(METASEQ_CASES))
def test_metaseq_checkpoint_matches_hf(case, tmp_path):
    variant, mp, fused, config = METASEQ_CASES[case]
    hf = hf_family(variant)
    model = zoo.load(save_metaseq(hf, tmp_path / "ckpt", mp, fused, config), dtype=torch.float32)
    left_padded = torch.cat([torch.ones(1, 5, dtype=torch.long), TOKENS[:1, 5:]], dim=1)
    mask = torch.ones_like(left_padded)
    mask[:, :5] = 0
    with torch.no_grad():
        want, got = hf(TOKENS).logits, model(TOKENS)
        want_padded = hf(left_padded, attention_mask=mask).logits[:, 5:]
        got_padded = model(left_padded, left_pad=torch.tensor([5]))[:, 5:]
    assert (got - want).abs().max() < FP32_TOL
    assert (got_padded - want_padded).abs().max() < FP32_TOL
    assert want.std() > 0.5


def _check_tp(rank, directories, want):
    for name, directory in directories.items():
        model = zoo.load(directory, dtype=torch.float32)
        with torch.no_grad():
            got = model(TOKENS)
        assert (got - want[name]).abs().max() < 1e-5, name


def test_tensor_parallel_world_2_equals_single_process(tmp_path):
    """Model-parallel files of size 2 and 1, loaded by 2 ranks: resharded, the fused qkv split per head."""
    directories = {
        "neox-mp2": save_neox(hf_family("neox-rotary-0.25-parallel"), tmp_path / "neox-mp2", mp=2, pipeline=False),
        "neox-mp1": save_neox(hf_family("neox-rotary-1.0-sequential"), tmp_path / "neox-mp1", mp=1),
        "metaseq-mp2-fused": save_metaseq(hf_family("opt-post-ln-proj"), tmp_path / "opt-mp2", 2, True, "cfg"),
    }
    with torch.no_grad():
        want = {name: zoo.load(d, dtype=torch.float32)(TOKENS) for name, d in directories.items()}
    spawn(_check_tp, 2, directories, want)


# ---- bad input -----------------------------------------------------------------------------------

def test_neox_errors_name_the_file_and_key(tmp_path):
    hf = hf_family("neox-rotary-0.25-parallel")
    directory = save_neox(hf, tmp_path / "no-yaml", mp=2)
    (directory / "configs" / "model.yml").unlink()
    with pytest.raises(zoo.CheckpointError, match="no YAML config"):
        zoo.load(directory)

    directory = save_neox(hf, tmp_path / "rank-missing", mp=2)
    (directory / "layer_03-model_01-model_states.pt").unlink()
    with pytest.raises(zoo.CheckpointError, match=r"layer_03 file of model-parallel rank\(s\) \[1\] is missing"):
        zoo.load(directory)

    directory = save_neox(hf, tmp_path / "tensor-missing", mp=1)
    path = directory / "layer_02-model_00-model_states.pt"
    tensors = torch.load(path)
    del tensors["attention.dense.weight"]
    torch.save(tensors, path)
    with pytest.raises(zoo.CheckpointError, match=r"missing tensor 'layer_02 files: attention.dense.weight' "
                                                  r"\(zoo's blocks.0.attn.wo.weight"):
        zoo.load(directory)

    directory = save_neox(hf, tmp_path / "learned-pos", mp=1)
    (directory / "configs" / "model.yml").write_text(neox_yaml(hf, 1, **{"pos-emb": "learned"}))
    with pytest.raises(zoo.CheckpointError, match=r"model.yml: pos-emb: 'learned' is not supported"):
        zoo.load(directory)

    directory = save_neox(hf, tmp_path / "no-heads", mp=1)
    (directory / "configs" / "model.yml").write_text(neox_yaml(hf, 1).replace('"num-attention-heads": 4,', ""))
    with pytest.raises(zoo.CheckpointError, match="missing required key.*num-attention-heads"):
        zoo.load(directory)

    directory = save_neox(hf, tmp_path / "shapes", mp=2)
    path = directory / "layer_02-model_01-model_states.pt"
    tensors = torch.load(path)
    tensors["mlp.dense_h_to_4h.weight"] = tensors["mlp.dense_h_to_4h.weight"][:, :10]
    torch.save(tensors, path)
    with pytest.raises(zoo.CheckpointError, match=r"mlp.dense_h_to_4h.weight' have shapes \[\(80, 64\), \(80, 10\)\]"):
        zoo.load(directory)


def test_metaseq_errors(tmp_path):
    hf = hf_family("opt-pre-ln")
    with pytest.raises(zoo.CheckpointError, match="restored.pt.*put the model's Hugging Face config.json beside it"):
        zoo.load(save_metaseq(hf, tmp_path / "no-config", 1, False, "none"))

    directory = save_metaseq(hf, tmp_path / "gap", 2, False, "json")
    (directory / "reshard-model_part-1.pt").rename(directory / "reshard-model_part-2.pt")
    with pytest.raises(zoo.CheckpointError, match=r"rank\(s\) \[1\] is missing"):
        zoo.load(directory)

    directory = tmp_path / "fsdp"
    directory.mkdir()
    torch.save({"model": {"decoder.layers.0.flat_param_0": torch.zeros(10)}}, directory / "restored.pt")
    with pytest.raises(zoo.CheckpointError, match="FSDP-flattened"):
        zoo.load(directory)

    directory = tmp_path / "scaled"
    directory.mkdir()
    torch.save({"model": metaseq_ranks(hf, 1, False)[0], "args": argparse.Namespace(
        **{**metaseq_cfg(hf), "no_scale_embedding": False})}, directory / "restored.pt")
    with pytest.raises(zoo.CheckpointError, match="no_scale_embedding=False is not supported"):
        zoo.load(directory)


def test_training_checkpoint_unpickler_runs_nothing(tmp_path):
    """Classes a training checkpoint names become inert stand-ins: nothing is imported or called."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model": {"w": torch.ones(2)}, "payload": Payload(), "args": argparse.Namespace(heads=4)},
               tmp_path / "x.pt")
    state = load_training_checkpoint(tmp_path / "x.pt")
    assert not marker.exists()
    assert torch.equal(state["model"]["w"], torch.ones(2))
    assert plain(state["args"]) == {"heads": 4}
    save_with_fake_omegaconf({"cfg": DictConfig({"model": {"decoder_layers": 2, "x": [1, 2]}})}, tmp_path / "y.pt")
    assert plain(load_training_checkpoint(tmp_path / "y.pt")["cfg"]) == {"model": {"decoder_layers": 2, "x": [1, 2]}}


def test_neox_tokenizer_from_the_config_vocab_file_and_run_py(tmp_path):
    """gpt-neox's config names its tokenizer.json (`vocab-file`, a path on the training machine): found by
    name beside the checkpoint; run.py then generates from the checkpoint as from any other."""
    import tokenizers
    from pydoc_data.topics import topics
    hf = hf_family("neox-rotary-0.25-parallel")
    directory = save_neox(hf, tmp_path / "ckpt", mp=2, step="global_step10")
    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train_from_iterator([topics[k] for k in sorted(topics)][:40], vocab_size=300,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tok.save(str(directory / "20B_tokenizer.json"))
    config = directory / "global_step10" / "configs" / "model.yml"
    yaml = config.read_text()
    config.write_text(yaml.replace("{\n", '{\n  "tokenizer-type": "HFTokenizer",\n  "vocab-file": '
                                          '"/data/20B_tokenizer.json",\n', 1))
    model = zoo.load(directory, dtype=torch.float32)
    text = "def f(x):\n    return x  # 42"
    assert model.tokenizer.encode(text, bos=False, eos=False) == tok.encode(text).ids
    assert model.tokenizer.eos_id == tok.token_to_id("<|endoftext|>")
    # gpt-neox's default tokenizer-type, GPT2BPETokenizer: GPT-2's vocab and merges files
    (directory / "20B_tokenizer.json").unlink()
    tok.save_model(str(directory))
    (directory / "vocab.json").rename(directory / "gpt2-vocab.json")
    (directory / "merges.txt").rename(directory / "gpt2-merges.txt")
    config.write_text(yaml.replace("{\n", '{\n  "vocab-file": "data/gpt2-vocab.json",\n  "merge-file": '
                                          '"data/gpt2-merges.txt",\n', 1))
    gpt2 = zoo.load(directory, dtype=torch.float32).tokenizer
    assert gpt2.encode(text) == tok.encode(text).ids and gpt2.eos_id == tok.token_to_id("<|endoftext|>")
    saved = zoo.quant.save(zoo.load(directory, quant="int8"), tmp_path / "int8")  # takes its tokenizer along
    again = zoo.load(saved).tokenizer
    assert again.encode(text) == tok.encode(text).ids and again.eos_id == tok.token_to_id("<|endoftext|>")
    config.write_text(yaml)  # the tokenizer.json run.py needs, beside `latest` this time
    tok.save(str(directory / "tokenizer.json"))
    status, out, err = run_py("--ckpt", str(directory), "--prompt", "The for", "--max-new-tokens", "6",
                              "--temperature", "0", "--dtype", "float32")
    assert status == 0, err
    assert out.startswith("The for") and "decode 5 tokens" in err


def test_training_checkpoint_unpickler_cannot_touch_torch():
    """A pickle's BUILD on a rebuild function changes only a wrapper; naming a torch submodule imports nothing."""
    import io
    import pickle

    from zoo.formats.files import StandIn, _StandInUnpickler
    defaults = torch._utils._rebuild_tensor_v2.__defaults__
    attack = (b"(cargparse\nNamespace\n)R"  # an object weights_only refuses, so the stand-in unpickler runs
              b"ctorch._utils\n_rebuild_tensor_v2\n(N}S'__defaults__'\n(S'pwned'\ntstb"  # BUILD on the function
              b"ctorch\n_dynamo\nt.")
    namespace, fn, dynamo = _StandInUnpickler(io.BytesIO(attack)).load()
    assert torch._utils._rebuild_tensor_v2.__defaults__ == defaults and fn.__defaults__ == ("pwned",)
    assert isinstance(namespace, StandIn) and isinstance(dynamo, type) and issubclass(dynamo, StandIn)
    blob = pickle.dumps({"act": Activation.RELU, "n": argparse.Namespace(a=1)})
    assert plain(_StandInUnpickler(io.BytesIO(blob)).load()) == {"act": "relu", "n": {"a": 1}}


def test_hf_checkpoint_with_deepspeed_leftovers_is_read_as_hf(tmp_path):
    """HF's Trainer under DeepSpeed leaves `latest` and global_stepN/mp_rank_00_model_states.pt beside config.json."""
    from helpers import save_hf
    hf = hf_family("neox-rotary-0.25-parallel")
    directory = save_hf(hf, tmp_path)
    (directory / "global_step5").mkdir()
    torch.save({"module": None, "iteration": 5}, directory / "global_step5" / "mp_rank_00_model_states.pt")
    (directory / "latest").write_text("global_step5")
    with torch.no_grad():
        assert (zoo.load(directory, dtype=torch.float32)(TOKENS) - hf(TOKENS).logits).abs().max() < FP32_TOL
