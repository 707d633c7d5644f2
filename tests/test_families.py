"""OPT, GPT-NeoX, GPT-2, Qwen2, Qwen3, Mistral, Gemma and Gemma 2 against Hugging Face's own classes for them
(helpers.HF_CLASSES) on the same weights; more on sliding windows in tests/test_families_window.py, on the
Gemmas in tests/test_families_gemma.py."""
import json
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import FAMILY_VARIANTS, hf_family, run_py, save_hf, spawn, torchrun

import zoo
from zoo import parallel

FP32_TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(FAMILY_VARIANTS))
def pair(request, tmp_path_factory):
    hf = hf_family(request.param)
    directory = save_hf(hf, tmp_path_factory.mktemp(request.param))
    return request.param, hf, zoo.load(directory, dtype=torch.float32), directory


def test_logits_match_hf_fp32(pair):
    _, hf, model, _ = pair
    tokens = torch.randint(0, 320, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = hf(tokens).logits, model(tokens)
    assert got.shape == want.shape
    assert (got - want).abs().max() < FP32_TOL
    assert want.std() > 0.5



def test_bf16_close_to_fp32_as_hf_bf16_is(pair):
    """As for LLaMA (test_llama_parity): measured against the fp32 logits, zoo's bf16 error may be no
    larger than HF's own bf16 error (mean within 10%, max within 25%). Measured: means equal to 2%
    (about 0.008 for logits of std 1.7; the new families' 0.009-0.019 against HF's 0.010-0.019), max 0.037-0.053
    against HF's 0.037-0.046 (the new families' 0.06-0.17 against 0.07-0.21)."""
    variant, hf, _, directory = pair
    model = zoo.load(directory, dtype=torch.bfloat16, device="cpu")
    hf16 = hf_family(variant).to(torch.bfloat16)
    tokens = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        exact = hf(tokens).logits
        ours = (model(tokens).float() - exact).abs()
        theirs = (hf16(tokens).logits.float() - exact).abs()
    assert model.embed.weight.dtype == torch.bfloat16
    assert ours.mean() <= 1.1 * theirs.mean(), (ours.mean(), theirs.mean())
    assert ours.max() <= 1.25 * theirs.max(), (ours.max(), theirs.max())
    assert ours.mean() < 0.03 * exact.std()

def test_left_padded_batch_matches_hf(pair):
    _, hf, model, _ = pair
    tokens = torch.randint(3, 320, (3, 20), generator=torch.Generator().manual_seed(2))
    left_pad = torch.tensor([0, 6, 13])
    mask = (torch.arange(20)[None] >= left_pad[:, None]).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # real tokens from 0 (GPT-2 would count the padding)
    with torch.no_grad():
        want = hf(tokens, attention_mask=mask, position_ids=positions).logits
        got = model(tokens, left_pad=left_pad)
    assert (got - want)[mask.bool()].abs().max() < FP32_TOL


def test_left_padded_generation_equals_each_row_alone(pair):
    """Prompts of 3, 14 and 8 tokens in one left-padded batch: each row's tokens are those it gets alone
    (OPT's and GPT-2's learned positions and NeoX's rotary ones must all skip the padding)."""
    _, _, model, _ = pair
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (3, 14, 8)]
    batched = zoo.generate(model, prompts, max_new_tokens=12, stop_ids=set())
    alone = [zoo.generate(model, [p], max_new_tokens=12, stop_ids=set())[0] for p in prompts]
    assert batched == alone
    assert all(len(x) == 12 for x in batched)


def test_greedy_generation_with_kv_cache_matches_hf(pair):
    _, hf, model, _ = pair
    prompt = torch.randint(3, 320, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False,
                           eos_token_id=None, pad_token_id=1)[0, 10:].tolist()
    assert zoo.generate(model, [prompt[0].tolist()], max_new_tokens=32, stop_ids=set())[0] == want
    assert len(want) == 32


def test_opt_without_model_prefix_and_with_bin(tmp_path):
    """opt-350m's hub file has keys without "model."; older checkpoints are pytorch_model.bin."""
    hf = hf_family("opt-post-ln-proj")
    hf.config.save_pretrained(tmp_path)
    torch.save({k.removeprefix("model."): v.clone() for k, v in hf.state_dict().items()}, tmp_path / "pytorch_model.bin")
    tokens = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        assert (zoo.load(tmp_path, dtype=torch.float32)(tokens) - hf(tokens).logits).abs().max() < FP32_TOL


@pytest.mark.parametrize("options", [dict(scale_attn_weights=False), dict(scale_attn_by_inverse_layer_idx=True),
                                     dict(scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True,
                                          activation_function="gelu", tie_word_embeddings=False, n_inner=None)])
def test_gpt2_options_match_hf(options, tmp_path):
    """GPT-2's other attention scales (unscaled, and / (layer + 1)), exact GELU, an untied lm_head, n_inner
    null: the logits of a prefill and of KV-cached steps as HF's, and zoo.save writes HF's checkpoint back."""
    matches_hf_prefill_steps_and_save(hf_family("gpt2", **options), tmp_path)


def matches_hf_prefill_steps_and_save(hf, tmp_path, seq: int = 16, cut: int = 9):
    """zoo's load of `hf` gives HF's logits in one forward, in a prefill of `cut` tokens then KV-cached steps of
    one, and after a zoo.save round trip (read back by HF's class); returns the model."""
    model = zoo.load(save_hf(hf, tmp_path / "hf"), dtype=torch.float32)
    tokens = torch.randint(0, 320, (2, seq), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = hf(tokens).logits
        cache = model.new_cache(2, seq)
        stepped = torch.cat([model(tokens[:, :cut], cache=cache)] + [model(tokens[:, i:i + 1], cache=cache)
                                                                     for i in range(cut, seq)], dim=1)
        again = type(hf).from_pretrained(zoo.save(model, tmp_path / "saved")).eval()(tokens).logits
        assert (model(tokens) - want).abs().max() < FP32_TOL
    assert (stepped - want).abs().max() < FP32_TOL
    assert (again - want).abs().max() < FP32_TOL
    return model


@pytest.mark.parametrize("options, refused", [(dict(add_cross_attention=True), "add_cross_attention"),
                                              (dict(activation_function="relu"), "activation_function 'relu'")])
def test_gpt2_options_zoo_cannot_run_are_refused(options, refused, tmp_path):
    directory = save_hf(hf_family("gpt2"), tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **options}))
    with pytest.raises(zoo.CheckpointError, match=refused):
        zoo.load(directory)


def _check_tp(rank, directories, tokens, want):
    for name, directory in directories.items():
        model = zoo.load(directory, dtype=torch.float32)
        assert isinstance(model.blocks[0].attn.wq, parallel.ColumnParallelLinear)
        with torch.no_grad():
            got = model(tokens)
            cache = model.new_cache(tokens.shape[0], tokens.shape[1])
            stepped = torch.cat([model(tokens[:, :8], cache=cache)] +
                                [model(tokens[:, i : i + 1], cache=cache) for i in range(8, tokens.shape[1])], dim=1)
        assert (got - want[name]).abs().max() < 1e-5, name
        assert (stepped - want[name]).abs().max() < 1e-5, name


def test_tensor_parallel_world_2_equals_single_process(tmp_path):
    """NeoX's fused qkv must be split per head (not by rows) for the ranks' slices to be right, GPT-2's
    transposed weights and q|k|v columns cut from the whole tensor (FAMILY.whole_tensors), also where the world
    size does not divide the vocabulary and MLP width (GPT-2's own 50257)."""
    directories = {v: save_hf(hf_family(v), tmp_path / v) for v in FAMILY_VARIANTS}
    directories["gpt2-321-170"] = save_hf(hf_family("gpt2", vocab_size=321, n_inner=170), tmp_path / "gpt2-321-170")
    tokens = torch.randint(0, 320, (2, 14), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = {v: zoo.load(d, dtype=torch.float32)(tokens) for v, d in directories.items()}
    spawn(_check_tp, 2, directories, tokens, want)


def test_unknown_model_type_lists_every_family(tmp_path):
    hf = hf_family("opt-pre-ln")
    save_hf(hf, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "bloom"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(zoo.CheckpointError, match="unknown model_type 'bloom'; supported: llama, opt, gpt_neox, gpt2, "
                                                  "qwen2, qwen3, mistral, gemma, gemma2"):
        zoo.load(tmp_path)


def _with_tokenizer(variant, directory):
    """Give a test checkpoint a byte-level BPE trained here: vocab.json + merges.txt for OPT and GPT-2,
    tokenizer.json for NeoX."""
    import tokenizers
    from pydoc_data.topics import topics
    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train_from_iterator([topics[k] for k in sorted(topics)][:40], vocab_size=300,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    if variant.startswith(("opt", "gpt2")):
        tok.save_model(str(directory))
    else:
        tok.save(str(directory / "tokenizer.json"))
    config = json.loads((directory / "config.json").read_text())
    config.update(bos_token_id=0, eos_token_id=0)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("variant", ["opt-post-ln-proj", "neox-rotary-0.25-parallel", "gpt2", "qwen3-head-dim-32-bias",
                                     "mistral-gqa-window-6", "gemma2-window-6-softcaps"])
def test_run_py_single_and_torchrun(variant, tmp_path):
    directory = _with_tokenizer(variant, save_hf(hf_family(variant), tmp_path))
    args = ("--ckpt", str(directory), "--prompt", "The for statement", "--max-new-tokens", "12",
            "--temperature", "0", "--dtype", "float32")
    status, out, err = run_py(*args)
    assert status == 0, err
    assert out.startswith("The for statement") and "decode 11 tokens" in err
    # (random weights: ids past the tokenizer's 300 tokens decode to nothing, as for OPT's padded vocabulary)
    two = torchrun(*args)
    assert two.returncode == 0, two.stderr
    assert two.stdout == out


def test_a_new_family_needs_only_its_file_and_a_registration(tmp_path, monkeypatch):
    """The family protocol (zoo/models/__init__.py): a LLaMA-like family, written as its own module would be
    (a model class and a Family), and registered (here by monkeypatch, for a real one a line in FAMILIES),
    loads from a config.json of its model_type, runs with hooks and a KV cache as LLaMA does, and is saved
    under its own name: nothing else in zoo names a family."""
    from helpers import hf_llama

    from zoo import hooks, models, quant
    from zoo.models import llama

    class Tinker(llama.Llama):  # the new family's model: LLaMA's, under another name
        pass

    family = models.Family("tinker", llama.LlamaConfig, llama.from_hf_config, Tinker, llama.hf_to_zoo,
                           llama.zoo_to_hf, llama.hf_tensor_to_zoo)
    monkeypatch.setitem(models.FAMILIES, "tinker", family)
    directory = save_hf(hf_llama("gqa"), tmp_path / "llama")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "tinker"}))
    model = zoo.load(directory, dtype=torch.float32)
    assert type(model) is Tinker and models.family_of(model) == "tinker"
    tokens = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(3))
    (directory / "config.json").write_text(json.dumps(config))
    reference = zoo.load(directory, dtype=torch.float32)
    recorded = hooks.collect("blocks.1.z")
    with torch.no_grad():
        assert torch.equal(model(tokens, hooks=recorded), reference(tokens))
    assert recorded["blocks.1.z"].shape == (2, 12, 4, 16)
    assert zoo.generate(model, [tokens[0].tolist()], 5, stop_ids=set()) == \
        zoo.generate(reference, [tokens[0].tolist()], 5, stop_ids=set())
    saved = quant.save(zoo.quant.quantize(model, "int8"), tmp_path / "q")
    from zoo.formats.files import safetensors_metadata
    assert safetensors_metadata(saved / "model.safetensors")["model_type"] == "tinker"
    with pytest.raises(ValueError, match=r"a Tinker2 is not a model of a registered family \(llama, opt, gpt_neox, "
                                         r"gpt2, qwen2, qwen3, mistral, gemma, gemma2, tinker\)"):
        models.family_of(type("Tinker2", (Tinker,), {})(model.config))


def test_hf_save_round_trip_and_quantized_load(pair, tmp_path):
    """zoo.save(format="hf") writes a checkpoint the family's Hugging Face class reads back to the same logits,
    and an int8 / int4 load of it stays close to fp32 (the family protocol is all quantization needs)."""
    variant, hf, model, directory = pair
    tokens = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(8))
    saved = zoo.save(model, tmp_path / "saved")
    again = type(hf).from_pretrained(saved).eval()
    with torch.no_grad():
        want = hf(tokens).logits
        assert (again(tokens).logits - want).abs().max() < FP32_TOL
        # mean error / the logits' std; measured: int8 0.006-0.022, int4 0.06-0.25 (these random weights
        # quantize worse than trained ones: LLaMA's own "gqa" variant gives 0.022 and 0.27)
        for quant, tol in (("int8", 0.05), ("int4", 0.35)):
            q = zoo.load(directory, dtype=torch.float32, quant=quant, group_size=32)
            assert (q(tokens) - want).abs().mean() < tol * want.std(), (variant, quant)


@pytest.mark.parametrize("variant, options", [("qwen2-gqa-tied-window-layer-1", dict(tie_word_embeddings=False)),
                                              ("qwen3-head-dim-32-bias", dict(attention_bias=False)),
                                              ("qwen3-head-dim-32-bias", dict(head_dim=8, num_key_value_heads=1))])
def test_qwen_options_match_hf(variant, options, tmp_path):
    """Qwen2 untied; Qwen3 without biases, and with heads narrower than dim / n_heads (and one kv head):
    prefill and KV-cached steps as HF's, and the zoo.save round trip."""
    model = matches_hf_prefill_steps_and_save(hf_family(variant, **options), tmp_path)
    assert model.blocks[0].attn.wq.bias is not None if variant.startswith("qwen2") else True
    assert model.blocks[0].attn.wo.bias is None or options.get("attention_bias", True)


def test_qwen3_normed_q_and_k_are_hook_points():
    """Qwen3 adds q_normed and k_normed (after the per-head RMSNorm, before rotary): they fire after q and k,
    hold HF's q_norm(q_proj x) per head (in HF's half-split layout there, in zoo's interleaved one here), and
    replacing them changes the output; LLaMA-like families without qk_norm do not have them."""
    from zoo import hooks
    hf = hf_family("qwen3-head-dim-32-bias")
    with tempfile.TemporaryDirectory() as d:
        model = zoo.load(save_hf(hf, Path(d)), dtype=torch.float32)
    names = hooks.names(model)
    assert names.index("blocks.0.v") < names.index("blocks.0.q_normed") < names.index("blocks.0.k_normed") \
        < names.index("blocks.0.pattern")
    assert list(model.hook_points(torch.zeros(1, 3, dtype=torch.long))) == names  # the order they fire in
    tokens = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(1))
    recorded = hooks.collect("blocks.1.q_normed", "blocks.1.k_normed")
    with torch.no_grad():
        plain = model(tokens, hooks=recorded)
        x = hf.model.embed_tokens(tokens)
        layer = hf.model.layers[0]
        x = layer(x, position_embeddings=hf.model.rotary_emb(x, torch.arange(10)[None]))
        x = x[0] if isinstance(x, tuple) else x
        attn = hf.model.layers[1].self_attn
        h = hf.model.layers[1].input_layernorm(x)
        want_q = attn.q_norm(attn.q_proj(h).view(1, 10, 4, 32))
        want_k = attn.k_norm(attn.k_proj(h).view(1, 10, 2, 32))
        halves = lambda t: t.unflatten(-1, (16, 2)).transpose(-1, -2).flatten(-2)  # interleaved -> half-split
        assert (halves(recorded["blocks.1.q_normed"]) - want_q).abs().max() < 1e-5
        assert (halves(recorded["blocks.1.k_normed"]) - want_k).abs().max() < 1e-5
        zeroed = model(tokens, hooks={"blocks.1.k_normed": lambda t, ctx: torch.zeros_like(t)})
    assert (zeroed - plain).abs().max() > 1e-3
    assert "blocks.0.q_normed" not in hooks.names(zoo.load(save_hf(hf_family("qwen2-gqa-tied-window-layer-1"),
                                                                   Path(tempfile.mkdtemp())), dtype=torch.float32))


@pytest.mark.parametrize("variant, options, refused", [
    ("qwen2-gqa-tied-window-layer-1", dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported by Qwen2"),
    ("qwen3-head-dim-32-bias", dict(rope_scaling=dict(rope_type="yarn", factor=4.0)),
     "unsupported rope scaling 'yarn'"),
])
def test_qwen_options_zoo_cannot_run_are_refused(variant, options, refused, tmp_path):
    directory = save_hf(hf_family(variant), tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config.pop("rope_parameters", None) if "rope_scaling" in options else None
    (directory / "config.json").write_text(json.dumps({**config, **options}))
    with pytest.raises(zoo.CheckpointError, match=refused):
        zoo.load(directory)


PUBLISHED = {  # the sizes of each one's config.json on the Hub, and its published parameter count
    "mistral-7b-v0.1": (dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, sliding_window=4096),
                        7_241_732_096),
    "qwen2.5-0.5b": (dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
                     494_032_768),
    "qwen3-0.6b": (dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                        tie_word_embeddings=True), 596_049_920),
    "gemma-2b": (dict(model_type="gemma", hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                      num_attention_heads=8, num_key_value_heads=1, head_dim=256, vocab_size=256000, hidden_act="gelu"),
                 2_506_172_416),
    "gemma-2-2b": (dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000,
                        sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
                   2_614_341_888),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_of_a_published_config(name, tmp_path):
    """`zoo inspect`'s count (the model built on the meta device from config.json alone) is the published one."""
    from zoo.__main__ import count
    from zoo.loader import build_empty
    config, published = PUBLISHED[name]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert count(build_empty(tmp_path)) == published


def test_perplexity_scores_each_token_as_one_forward_of_its_window(pair):
    """zoo.perplexity.evaluate on every family (windows of 16 tokens every 8, past the sliding windows): each
    token's NLL is the one Hugging Face's forward of its window gives it (fp32, 1e-4)."""
    from zoo import perplexity
    _, hf, model, _ = pair
    ids = torch.randint(0, 320, (45,), generator=torch.Generator().manual_seed(3))
    result = perplexity.evaluate(model, ids, ctx=16, stride=8)
    want = []
    with torch.no_grad():
        for begin, end, first in perplexity.windows(len(ids), 16, 8):
            logits = hf(ids[None, begin:end]).logits[0].double()
            want.append(torch.nn.functional.cross_entropy(logits[first - 1 - begin:end - 1 - begin], ids[first:end],
                                                          reduction="none"))
    want = torch.cat(want)
    assert result.tokens == len(ids) - 1 == want.numel()
    assert (result.nll - want).abs().max() < 1e-4


def test_collect_stores_each_prompt_as_its_forward_alone(pair, tmp_path):
    """zoo.activations.write (python -m zoo collect) on every family: left-padded batches of 3, every point (but
    the patterns, which collect refuses) at every position, each stored row within fp32 rounding (1e-5 of the scale) of a collect of that prompt alone."""
    import shutil
    from zoo import activations, hooks
    variant, _, _, directory = pair
    directory = _with_tokenizer(variant, shutil.copytree(directory, tmp_path / "ckpt"))
    model = zoo.load(directory, dtype=torch.float32)
    texts = ["The for statement", "import os", "Raise an exception if the argument is not an integer", "x = 1"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    points = [name for name in model.hook_points(torch.tensor([[1, 2]])) if not name.endswith(".pattern")]
    out = activations.write(model, prompts, tmp_path / "acts", points, positions="all", batch=3, dtype=torch.float32)
    index = activations.read_index(out)
    assert index["complete"] and len(index["prompts"]) == len(texts)
    for entry, text in zip(index["prompts"], texts):
        alone = hooks.collect(*index["points"])
        with torch.no_grad():
            model(torch.tensor([model.tokenizer.encode(text, bos=True)]), hooks=alone)
        stored, scale = activations.rows(out, entry), max(x.abs().max().item() for x in alone.values())
        for name in index["points"]:
            assert (stored[name] - alone[name][0]).abs().max() <= 1e-5 * scale, (variant, name)
