"""zoo.weights, the model map: the same names and shapes on every family, views that edits reach, and
differential checks: a weight edit equals the hook ablation it stands for, a model rebuilt from the map alone
gives the same logits, and the per-head circuits equal those from Hugging Face's own projection weights."""
import pytest
import torch
from helpers import FAMILY_VARIANTS, hf_family, hf_llama, save_hf

import zoo
from zoo import hooks
from zoo.weights import half_split

VARIANTS = ["llama-gqa", *sorted(FAMILY_VARIANTS)]
TOKENS = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(0))


def build(variant):
    return hf_llama("gqa") if variant == "llama-gqa" else hf_family(variant)


@pytest.fixture(scope="module", params=VARIANTS)
def pair(request, tmp_path_factory):
    hf = build(request.param)
    directory = save_hf(hf, tmp_path_factory.mktemp(request.param))
    return hf, directory


def fresh(directory):
    return zoo.load(directory, dtype=torch.float32)


def run(model, hook_spec=None):
    with torch.no_grad():
        return model(TOKENS, hooks=hook_spec)


def test_names_and_shapes_are_the_documented_ones(pair):
    _, directory = pair
    model = fresh(directory)
    c, W = model.config, zoo.weights(model)
    assert (c.d_model, c.d_mlp, c.d_head, c.d_vocab, c.n_ctx) == (c.dim, c.hidden_dim, c.head_dim, c.vocab_size,
                                                                    c.max_seq_len)
    assert c.normalization in ("rms", "layer") and c.positional in ("rotary", "learned")
    embed = model.embed.weight.shape[1]
    want = {"embed.W_E": (c.d_vocab, embed), "unembed.W_U": (embed, c.d_vocab)}
    for i in range(c.n_layers):
        want.update({f"blocks.{i}.attn.W_Q": (c.n_heads, c.d_model, c.d_head),
                     f"blocks.{i}.attn.W_K": (c.n_kv_heads, c.d_model, c.d_head),
                     f"blocks.{i}.attn.W_V": (c.n_kv_heads, c.d_model, c.d_head),
                     f"blocks.{i}.attn.W_O": (c.n_heads, c.d_head, c.d_model),
                     f"blocks.{i}.mlp.W_in": (c.d_model, c.d_mlp), f"blocks.{i}.mlp.W_out": (c.d_mlp, c.d_model)})
    for name, shape in want.items():
        assert tuple(W[name].shape) == shape, name
    assert ("pos_embed.W_pos" in W) == (c.positional == "learned")
    if c.positional == "learned":
        assert tuple(W["pos_embed.W_pos"].shape) == (c.n_ctx, c.d_model)
    assert sorted(W["blocks.*.attn.W_O"]) == [f"blocks.{i}.attn.W_O" for i in range(c.n_layers)]
    with pytest.raises(KeyError, match=r"no weight 'blocks.0.attn.W_X'; nearest: blocks.0.attn.W_"):
        W["blocks.0.attn.W_X"]


def test_zeroing_a_heads_W_O_is_zero_ablating_it_on_z(pair):
    _, directory = pair
    model = fresh(directory)
    want = run(model, {"blocks.1.z": hooks.ablate(heads=[1])})
    zoo.weights(model)["blocks.1.attn.W_O"][1] = 0  # in place, through the view
    assert (run(model) - want).abs().max() < 1e-5
    assert (run(fresh(directory)) - want).abs().max() > 1e-3


def test_zeroing_a_neurons_W_out_is_ablating_it_on_mlp_post(pair):
    _, directory = pair
    model = fresh(directory)
    want = run(model, {"blocks.0.mlp_post": hooks.ablate(neurons=[3, 7])})
    W = zoo.weights(model)
    W_out = W["blocks.0.mlp.W_out"].clone()
    W_out[[3, 7]] = 0
    W["blocks.0.mlp.W_out"] = W_out  # by assignment
    assert (run(model) - want).abs().max() < 1e-5


def test_a_model_rebuilt_from_the_map_alone_gives_the_same_logits(pair):
    _, directory = pair
    source, target = fresh(directory), fresh(directory)
    want = run(source)
    for p in target.parameters():
        p.data.normal_()  # nothing of the original left
    W = zoo.weights(target)
    for name, t in zoo.weights(source).items():
        W[name] = t
    assert torch.equal(run(target), want)


def test_circuits_equal_those_from_hugging_faces_projections(pair):
    """Per head, W_Q[h] @ W_K[g].T and W_V[g] @ W_O[h], g = h's kv head, from HF's q/k/v/o_proj (or NeoX's fused
    query_key_value, OPT's out_proj): the rotary basis does not enter; half_split gives HF's W_Q itself."""
    hf, directory = pair
    model = fresh(directory)
    c, W = model.config, zoo.weights(model)
    attn = next(m for n, m in hf.named_modules() if n.endswith("layers.1.self_attn") or n.endswith("layers.1.attention"))
    if hasattr(attn, "query_key_value"):  # NeoX: per head, q, k, v rows in turn
        qkv = attn.query_key_value.weight.view(c.n_heads, 3, c.d_head, c.d_model)
        q, k, v, o = qkv[:, 0].reshape(-1, c.d_model), qkv[:, 1].reshape(-1, c.d_model), qkv[:, 2].reshape(-1, c.d_model), \
            attn.dense.weight
    else:
        q, k, v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
        o = attn.o_proj.weight if hasattr(attn, "o_proj") else attn.out_proj.weight
    heads = lambda w, n: w.detach().view(n, c.d_head, c.d_model).transpose(1, 2)  # noqa: E731
    hq, hk, hv = heads(q, c.n_heads), heads(k, c.n_kv_heads), heads(v, c.n_kv_heads)
    ho = o.detach().view(c.d_model, c.n_heads, c.d_head).permute(1, 2, 0)
    group = c.n_heads // c.n_kv_heads
    for h in range(c.n_heads):
        g = h // group
        qk, theirs = W["blocks.1.attn.W_Q"][h] @ W["blocks.1.attn.W_K"][g].T, hq[h] @ hk[g].T
        assert (qk - theirs).abs().max() < 1e-5 * theirs.abs().max(), h
        ov, theirs = W["blocks.1.attn.W_V"][g] @ W["blocks.1.attn.W_O"][h], hv[g] @ ho[h]
        assert (ov - theirs).abs().max() < 1e-5 * theirs.abs().max(), h
    if c.positional == "rotary" and model.blocks[0].attn.interleaved:  # LLaMA: Meta's pairs; HF's by half_split
        assert torch.equal(half_split(W["blocks.1.attn.W_Q"]), hq)


def test_quantized_layers_are_refused_with_a_reason(tmp_path):
    directory = save_hf(hf_llama("gqa"), tmp_path)
    W = zoo.weights(zoo.load(directory, dtype=torch.float32, quant="int8"))
    assert tuple(W["embed.W_E"].shape)[0] == 320  # the embedding stays in floating point
    with pytest.raises(NotImplementedError, match=r"blocks.0.attn.W_Q is a quantized layer"):
        W["blocks.0.attn.W_Q"]
