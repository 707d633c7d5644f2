"""zoo.weights, the model map: the same names and shapes on every family, views that edits reach, and
differential checks: a weight edit equals the hook ablation it stands for, a model rebuilt from the map alone
gives the same logits, and the per-head circuits equal those from Hugging Face's own projection weights. Tied
embeddings are one tensor; quantized reads are reference.py's dequantization and writes re-quantize; at
world size 2 reads and writes (in-place edits of the gathered copies included) equal one process's."""
import pytest
import torch
from helpers import FAMILY_VARIANTS, check_outcome, hf_family, hf_llama, save_hf, spawn_checks

import zoo
from zoo import hooks, parallel
from zoo.kernels.reference import dequantize_int4, dequantize_int8
from zoo.weights import WriteThrough, half_split

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
    query_key_value, OPT's out_proj, GPT-2's Conv1D c_attn and c_proj): the rotary basis does not enter;
    half_split gives HF's W_Q itself."""
    hf, directory = pair
    model = fresh(directory)
    c, W = model.config, zoo.weights(model)
    attn = next(m for n, m in hf.named_modules() if n.endswith(("layers.1.self_attn", "layers.1.attention", "h.1.attn")))
    if hasattr(attn, "c_attn"):  # GPT-2: weights stored [in, out]; c_attn's columns all of q, then k, then v
        (q, k, v), o = attn.c_attn.weight.T.chunk(3), attn.c_proj.weight.T
    elif hasattr(attn, "query_key_value"):  # NeoX: per head, q, k, v rows in turn
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


def test_zero_ablation_at_positions_is_the_weight_edit_there_only(pair):
    """ablate(heads=[1], positions=[2, 5]) in zero mode on z: blocks.1.attn_out at each row's positions 2 and 5
    is that of the model whose W_O[1] is zero, everywhere else the unedited model's (a left-padded row counts
    positions from its first real token)."""
    _, directory = pair
    model, edited = fresh(directory), fresh(directory)
    zoo.weights(edited)["blocks.1.attn.W_O"][1] = 0
    left_pad = torch.tensor([0, 3])

    def attn_out(m, spec=None):
        seen = hooks.collect("blocks.1.attn_out")
        with torch.no_grad():
            m(TOKENS, hooks=[spec or {}, seen], left_pad=left_pad)
        return seen["blocks.1.attn_out"], seen.positions("blocks.1.attn_out")

    ablated, positions = attn_out(model, {"blocks.1.z": hooks.ablate(heads=[1], positions=[2, 5])})
    plain, zeroed = attn_out(model)[0], attn_out(edited)[0]
    chosen, real = (positions == 2) | (positions == 5), positions >= 0
    assert chosen.sum() == 4 and positions[1, 3] == 0
    assert (ablated[chosen] - zeroed[chosen]).abs().max() < 1e-5
    assert (ablated[real & ~chosen] - plain[real & ~chosen]).abs().max() < 1e-5
    assert (plain[chosen] - zeroed[chosen]).abs().max() > 1e-3  # head 1 writes something there


@pytest.mark.parametrize("variant", ["llama-tied", "opt-pre-ln"])
def test_tied_embeddings_are_one_tensor_an_edit_of_either_is_both(variant, tmp_path):
    hf = hf_llama("tied-embeddings") if variant == "llama-tied" else hf_family(variant)
    model = fresh(save_hf(hf, tmp_path))
    assert model.output.weight is model.embed.weight
    W = zoo.weights(model)
    W["embed.W_E"][3] = 0  # in place
    assert W["unembed.W_U"][:, 3].abs().max() == 0 and run(model)[..., 3].abs().max() == 0  # no b_U on either
    t = torch.randn(W["unembed.W_U"].shape)
    W["unembed.W_U"] = t
    assert torch.equal(W["embed.W_E"], t.T) and torch.equal(model.embed.weight, t.T)


# ---- quantized models: reads dequantize as reference.py does, writes re-quantize ------------------------------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_hf(hf_llama("gqa"), tmp_path_factory.mktemp("llama"))


def reference(layer):
    """zoo/kernels/reference.py's dequantization of a QuantLinear's stored tensors, fp32 [N, K]."""
    q = layer.quantized
    if layer.scheme.name == "int8":
        return dequantize_int8(q.qweight, q.scales)
    return dequantize_int4(q.packed, q.scales, q.zeros, q.group_size)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_reads_equal_the_reference_dequantization(llama_dir, scheme):
    model = zoo.load(llama_dir, dtype=torch.float32, quant=scheme, group_size=32)
    c, W, floating = model.config, zoo.weights(model), zoo.weights(fresh(llama_dir))
    attn, mlp = model.blocks[1].attn, model.blocks[1].mlp
    assert torch.equal(W["blocks.1.attn.W_Q"], reference(attn.wq).view(c.n_heads, c.d_head, c.d_model).transpose(1, 2))
    assert torch.equal(W["blocks.1.attn.W_K"], reference(attn.wk).view(c.n_kv_heads, c.d_head, c.d_model).transpose(1, 2))
    assert torch.equal(W["blocks.1.attn.W_O"], reference(attn.wo).view(c.d_model, c.n_heads, c.d_head).permute(1, 2, 0))
    assert torch.equal(W["blocks.1.mlp.W_gate"], reference(mlp.w_gate).T)
    assert torch.equal(W["unembed.W_U"], reference(model.output).T)  # untied: quantized too
    assert isinstance(W["blocks.1.attn.W_Q"], WriteThrough) and not isinstance(W["embed.W_E"], WriteThrough)
    if scheme == "int4":  # K = 176 is no whole number of groups of 32: w_out stays in floating point, a view
        assert not isinstance(W["blocks.1.mlp.W_out"], WriteThrough)
    error = 0.01 if scheme == "int8" else 0.1  # every name in the same layout as the float model's, within rounding
    for name, t in floating.items():
        assert W[name].shape == t.shape and (W[name] - t).abs().max() < error, name


def load_quantized(directory, scheme):
    return zoo.load(directory, dtype=torch.float32, quant=scheme, group_size=32)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_quantized_in_place_edit_is_the_hook_ablation_it_stands_for(llama_dir, scheme):
    """Zeroing neuron 3's input W_in[:, 3] of a dequantized copy re-quantizes that row of w_in alone (the others keep
    their codes) and the forward equals ablating neuron 3 on mlp_post; int8 after a forward too (its layout is
    made again)."""
    model, plain = load_quantized(llama_dir, scheme), load_quantized(llama_dir, scheme)
    want = run(plain, {"blocks.0.mlp_post": hooks.ablate(neurons=[3])})
    if scheme == "int8":  # int4 on the CPU lets its stored weight go at the first forward (see below)
        assert (run(model) - want).abs().max() > 1e-3
    W = zoo.weights(model)
    before = W["blocks.0.mlp.W_in"].clone()
    W["blocks.0.mlp.W_in"][:, 3] = 0
    after = W["blocks.0.mlp.W_in"]
    assert after[:, 3].abs().max() == 0 and torch.equal(after[:, :3], before[:, :3]) and torch.equal(after[:, 4:],
                                                                                                     before[:, 4:])
    assert (run(model) - want).abs().max() < 1e-5


def _linear(weight):
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False).requires_grad_(False)
    layer.weight.copy_(weight)
    return layer


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_assignments_requantize_and_the_forward_is_the_maps(llama_dir, scheme):
    """An assignment quantizes the layer as the scheme quantizes that float weight; an in-place edit the copy holds
    afterwards what the model holds; the forward is then that of a float model rebuilt from the map (within twice the
    CPU kernels' bf16 rounding, as an unedited quantized model differs from its own rebuild). On the CPU an int4
    layer lets its stored weight go at its first forward: a read after that is its layout's weight (the same, to
    fp32 rounding), an edit an error that says so."""
    model = load_quantized(llama_dir, scheme)
    unedited = run(load_quantized(llama_dir, scheme))
    W = zoo.weights(model)
    W_Q = W["blocks.0.attn.W_Q"].clone()
    t = torch.randn(W["blocks.1.mlp.W_in"].shape, generator=torch.Generator().manual_seed(1)) * 0.15
    W["blocks.1.mlp.W_in"] = t
    assert torch.equal(W["blocks.1.mlp.W_in"], reference(zoo.quant.quantize_linear(_linear(t.T), scheme, 32)).T)
    copy = W["blocks.1.attn.W_O"]
    copy[2] *= 0.5  # no longer on the quantization grid: re-quantized, and the copy holds the result
    assert torch.equal(copy, W["blocks.1.attn.W_O"]) and torch.equal(copy, model.blocks[1].attn.wo.dequantize().view(
        model.config.d_model, model.config.n_heads, -1).permute(1, 2, 0))
    rebuilt = fresh(llama_dir)
    R = zoo.weights(rebuilt)
    for name, tensor in W.items():
        R[name] = tensor
    got = run(model)
    # within the CPU kernels' own rounding: what an unedited quantized model differs from its float rebuild
    plain, rebuilt_plain = load_quantized(llama_dir, scheme), fresh(llama_dir)
    P = zoo.weights(rebuilt_plain)
    for name, tensor in zoo.weights(plain).items():
        P[name] = tensor
    rounding = (run(plain) - run(rebuilt_plain)).abs().max()
    assert (got - run(rebuilt)).abs().max() < 2 * rounding + 1e-3 and (got - unedited).abs().max() > 0.5
    let_go = model.blocks[0].attn.wq.quantized is None  # the read below is then the layout's weight
    assert let_go == (scheme == "int4" and model.embed.weight.device.type == "cpu")
    assert (W["blocks.0.attn.W_Q"] - W_Q).abs().max() < 1e-6
    if let_go:
        with pytest.raises(RuntimeError, match=r"blocks.0.attn.W_Q: this int4 layer's stored weight was let go at its "
                                               r"first forward .* can be read \(dense_weight\) but not edited"):
            W["blocks.0.attn.W_Q"][0] = 0


# ---- tensor parallelism: reads gather, writes scatter, padding stays zero ----------------------------------

TP_VARIANTS = {  # sizes world size 2 does not divide (a vocabulary of 321, an MLP width of 171): padded
    "llama": lambda: hf_llama("gqa", vocab_size=321, intermediate_size=171),
    "llama-tied": lambda: hf_llama("tied-embeddings", vocab_size=321, intermediate_size=171),
    "opt-post-ln-proj": lambda: hf_family("opt-post-ln-proj", vocab_size=321, ffn_dim=171),
    "neox": lambda: hf_family("neox-rotary-0.25-parallel", vocab_size=321, intermediate_size=171)}
COLUMN_PARALLEL = ("blocks.0.attn.W_Q", "blocks.0.attn.W_K", "blocks.1.attn.W_V", "blocks.0.mlp.W_in",
                   "blocks.1.mlp.W_gate", "unembed.W_U")  # rows whole on a rank: int8 codes as in one process


def one_process(directory):
    """What the checks at world size 2 must equal: the map's reads; new values for every name and the reads and
    logits after assigning them all; the logits after zeroing W_O[1] of block 1 in place."""
    model = fresh(directory)
    reads = {name: t.clone() for name, t in zoo.weights(model).items()}
    g = torch.Generator().manual_seed(2)
    new = {name: t * (1 + 0.1 * torch.randn(t.shape, generator=g)) for name, t in reads.items()}
    W = zoo.weights(model)
    for name, t in new.items():
        W[name] = t
    edited = fresh(directory)
    zoo.weights(edited)["blocks.1.attn.W_O"][1] = 0
    return {"reads": reads, "new": new, "after": {name: t.clone() for name, t in W.items()}, "logits after": run(model),
            "logits edited": run(edited)}


def one_process_int8(directory):
    model = zoo.load(directory, dtype=torch.float32, quant="int8")
    W = zoo.weights(model)
    reads = {name: W[name].clone() for name in COLUMN_PARALLEL}
    W["blocks.0.mlp.W_in"][:, 3] = 0
    return {"reads": reads, "after": W["blocks.0.mlp.W_in"].clone()}


def _check_padding_is_zero(model):
    """The last rank's rows past the vocabulary and the MLP width (w_out: columns) are zeros."""
    c, last = model.config, parallel.rank() == parallel.world_size() - 1
    output, w_in, w_out = model.output.weight, model.blocks[0].mlp.w_in.weight, model.blocks[0].mlp.w_out.weight
    assert not last or output[c.d_vocab - parallel.rank() * output.shape[0]:].abs().max() == 0
    real = c.d_mlp - parallel.rank() * w_in.shape[0]
    assert not last or (w_in[real:].abs().max() == 0 and w_out[:, real:].abs().max() == 0)
    assert output.shape[0] * 2 > c.d_vocab and w_in.shape[0] * 2 > c.d_mlp  # padded at world size 2


def _check_reads_and_writes(rank, dirs, want):
    """Every read equals one process's (a WriteThrough copy, the unsplit shapes); assigning every name gives one
    process's reads and logits; the padding stays zero; an in-place edit of a gathered copy reaches the model."""
    for variant, directory in dirs.items():
        w = want[variant]
        model = fresh(directory)
        W = zoo.weights(model)
        assert sorted(W) == sorted(w["reads"]), variant
        for name, t in w["reads"].items():
            got = W[name]
            assert isinstance(got, WriteThrough) and torch.equal(got, t), (variant, name)
        for name, t in w["new"].items():
            W[name] = t
        for name, t in w["after"].items():
            assert torch.equal(W[name], t), (variant, name)
        assert (run(model) - w["logits after"]).abs().max() < 1e-4, variant
        _check_padding_is_zero(model)
        edited = fresh(directory)
        W = zoo.weights(edited)
        W["blocks.1.attn.W_O"][1] = 0  # in place, on the gathered copy
        assert (run(edited) - w["logits edited"]).abs().max() < 1e-4, variant
        if edited.config.tie_embeddings:  # one parameter, split on the vocabulary for both
            W["embed.W_E"][3] = 0
            assert W["unembed.W_U"][:, 3].abs().max() == 0 and edited.output.weight is edited.embed.weight


def _check_values_differing_between_ranks(rank, directory):
    model = fresh(directory)
    W = zoo.weights(model)
    for name in ("ln_final.w", "blocks.0.mlp.W_in"):  # held whole; split
        before = W[name].clone()
        with pytest.raises(ValueError, match=rf"zoo.weights: {name} was given different values on different ranks"):
            W[name] = torch.full(before.shape, float(rank))
        assert torch.equal(W[name], before)


def _check_quantized(rank, directory, want, floating):
    """int8 at world size 2: each rank's shard dequantized and gathered (column-parallel layers' codes are one
    process's); zeroing W_in[:, 3] in place re-quantizes that row on the rank holding it and equals the ablation."""
    model = zoo.load(directory, dtype=torch.float32, quant="int8")
    W = zoo.weights(model)
    for name, t in want["reads"].items():
        assert torch.equal(W[name], t), name
    for name, t in floating.items():  # row-parallel layers too: the same layout, within int8 rounding
        assert (W[name] - t).abs().max() < 0.01, name
    ablated = run(model, {"blocks.0.mlp_post": hooks.ablate(neurons=[3])})  # the layouts made
    W["blocks.0.mlp.W_in"][:, 3] = 0
    assert torch.equal(W["blocks.0.mlp.W_in"], want["after"])
    assert (run(model) - ablated).abs().max() < 1e-5
    w_in, c = model.blocks[0].mlp.w_in.quantized, model.config
    if rank == 1:  # the padding row still zero codes
        assert w_in.qweight[c.d_mlp - w_in.qweight.shape[0]:].abs().max() == 0


@pytest.fixture(scope="module")
def world_2(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    dirs = {name: save_hf(build(), root / name) for name, build in TP_VARIANTS.items()}
    want = {name: one_process(d) for name, d in dirs.items()}
    checks = {"reads-and-writes-equal-one-process": (_check_reads_and_writes, (dirs, want)),
              "a-value-differing-between-ranks-is-refused": (_check_values_differing_between_ranks, (dirs["llama"],)),
              "int8-reads-dequantize-and-edits-requantize": (_check_quantized, (dirs["llama"], one_process_int8(dirs["llama"]),
                                                                                want["llama"]["reads"]))}
    out = tmp_path_factory.mktemp("world-2")
    spawn_checks(checks, 2, out)
    return out


@pytest.mark.parametrize("check", ["reads-and-writes-equal-one-process", "a-value-differing-between-ranks-is-refused",
                                   "int8-reads-dequantize-and-edits-requantize"])
def test_world_2(world_2, check):
    """One pair of ranks runs every check (started once); each case reads its own outcome."""
    check_outcome(world_2, check, 2)
