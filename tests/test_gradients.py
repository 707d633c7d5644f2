"""Gradients through hook points (collect(grads=True)): against finite differences of the metric, in the
recordings' layout on a left-padded batch, through quantized layers (the dequantized weight), and at
world size 2 equal to one process."""
import pytest
import torch
from helpers import hf_llama, save_hf, spawn

import zoo
from zoo import hooks
from zoo.kernels.cpu import pack_int4_for_cpu
from zoo.quant.linear import QuantLinear

POINTS = ["blocks.0.resid_pre", "blocks.3.resid_pre", "blocks.4.attn_out", "blocks.2.z", "blocks.1.mlp_post",
          "blocks.5.mlp_pre", "blocks.1.pattern", "blocks.2.q"]
TOKENS = torch.randint(0, 4096, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def fp64(tiny_dir):
    """The tiny model in fp64 (its norms and rotary still compute in fp32, as zoo's do in every dtype)."""
    return zoo.load(tiny_dir, dtype=torch.float32).double()


def metric_of(model, ln_final):
    """A logit difference summed over the batch, from ln_final in the model's dtype (the logits are fp32)."""
    w = model.output.weight
    return ((w[5] - w[7]) * ln_final[:, -1]).sum()


def with_metric(model, spec):
    """model(TOKENS, hooks=spec) -> the metric of its ln_final, differentiable."""
    seen = []
    model(TOKENS, hooks=[spec, {"ln_final": lambda x, ctx: seen.append(x)}])
    return metric_of(model, seen[0])


def test_gradients_equal_finite_differences(fp64):
    cache = hooks.collect(*POINTS, grads=True)
    with_metric(fp64, cache).backward()
    assert not any(p.grad is not None for p in fp64.parameters())  # the parameters stay frozen
    eps = 3e-3
    for name in POINTS:
        g = cache.grads[name]
        assert g.shape == cache[name].shape and g.dtype == torch.float64, name
        for direction in (g / g.norm(), torch.randn(g.shape, generator=torch.Generator().manual_seed(1),
                                                    dtype=g.dtype)):
            direction = direction / direction.norm()
            with torch.no_grad():
                up, down = [with_metric(fp64, {name: lambda x, ctx, s=s: x + s * eps * direction}).item()
                            for s in (1, -1)]
            slope = (up - down) / (2 * eps)
            assert abs(slope - (g * direction).sum().item()) < 1e-3 * g.norm().item(), name


def test_gradients_of_a_padded_batch_are_each_row_alone(tiny_dir):
    """Row 1, left-padded by 3, has the gradients of its own forward, shifted; padding gets none."""
    model = zoo.load(tiny_dir, dtype=torch.float32)
    names = ["blocks.2.resid_pre", "blocks.1.z", "blocks.3.mlp_post"]
    padded = TOKENS.clone()
    padded[1, :3] = 0
    cache = hooks.collect(*names, grads=True)
    logits = model(padded, hooks=cache, left_pad=torch.tensor([0, 3]))
    (logits[:, -1, 5] - logits[:, -1, 7]).sum().backward()
    alone = hooks.collect(*names, grads=True)
    logits = model(TOKENS[1:, 3:], hooks=alone)
    (logits[:, -1, 5] - logits[:, -1, 7]).sum().backward()
    for name in names:
        assert torch.equal(cache.positions(name), torch.tensor([list(range(10)), list(range(-3, 7))]))
        assert (cache.grads[name][1, 3:] - alone.grads[name][0]).abs().max() < 1e-5, name
        assert cache.grads[name][1, :3].abs().max() == 0, name


def test_gradients_add_up_over_backward_passes_and_a_new_run_clears_them(tiny_dir):
    model = zoo.load(tiny_dir, dtype=torch.float32)
    cache = hooks.collect("blocks.1.resid_post", grads=True)
    with pytest.raises(KeyError, match="no gradient has reached 'blocks.1.resid_post' yet"):
        model(TOKENS, hooks=cache)
        cache.grads["blocks.1.resid_post"]
    metric = model(TOKENS, hooks=cache)[:, -1, 3].sum()
    metric.backward(retain_graph=True)
    once = cache.grads["blocks.1.resid_post"].clone()
    metric.backward()
    assert torch.allclose(cache.grads["blocks.1.resid_post"], 2 * once)
    model(TOKENS, hooks=cache)[:, -1, 3].sum().backward()
    assert torch.allclose(cache.grads["blocks.1.resid_post"], once)
    assert list(cache.grads) == ["blocks.1.resid_post"] and "blocks.1.resid_post" in cache.grads
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"collect\(grads=True\) at blocks.1.resid_post: autograd "
                                                            r"is off"):
        model(TOKENS, hooks=cache)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="autograd is off"):
        model(TOKENS, hooks=cache)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_gradients_are_the_float_models_with_dequantized_weights(tiny_dir, scheme):
    quantized = zoo.load(tiny_dir, dtype=torch.float32, quant=scheme, group_size=64)
    dense = zoo.load(tiny_dir, dtype=torch.float32)
    modules = dict(dense.named_modules())
    with torch.no_grad():
        for name, layer in quantized.named_modules():
            if isinstance(layer, QuantLinear):
                modules[name].weight.copy_(layer.dense_weight())
    with torch.no_grad():
        plain = quantized(TOKENS)
    got = []
    for model in (quantized, dense):
        cache = hooks.collect("blocks.*.resid_pre", "blocks.*.z", "blocks.*.mlp_post", grads=True)
        logits = model(TOKENS, hooks=cache)
        (logits[:, -1, 5] - logits[:, -1, 9]).sum().backward()
        got.append((logits.detach(), cache))
    assert torch.equal(got[0][0], plain)  # the forward is the scheme's matmul, gradient or not
    assert (got[0][0] - got[1][0]).abs().max() < 1e-4
    for name in got[1][1].grads:
        assert (got[0][1].grads[name] - got[1][1].grads[name]).abs().max() < 1e-5, name
    assert not any(p.requires_grad for p in quantized.parameters())


def test_dense_weight_of_every_cpu_layout(tiny_dir):
    """A layer whose layout keeps no stored weight reads it from the layout; torch's int4 layout, which has no
    dequantization of its own, through its matmul of the identity (bf16)."""
    model = zoo.load(tiny_dir, dtype=torch.float32, quant="int4", group_size=64)
    layer = model.blocks[0].attn.wk
    want = layer.dequantize()
    stored = layer.quantized
    model(TOKENS[:, :2])  # the first forward lays the weight out and lets the stored one go
    assert layer.quantized is None and torch.allclose(layer.dense_weight(), want)
    layer.prepared = pack_int4_for_cpu(stored.packed, stored.scales, stored.zeros, stored.group_size)
    assert (layer.dense_weight() - want).abs().max() <= want.abs().max() * 2 ** -8


def _check_world_2(rank, directory, want):
    model = zoo.load(directory, dtype=torch.float32)
    for gather in (True, False):
        cache = hooks.collect("blocks.*.resid_pre", "blocks.0.z", "blocks.1.mlp_post", gather=gather, grads=True)
        logits = model(want["tokens"], hooks=cache)
        (logits[:, -1, 5] - logits[:, -1, 9]).sum().backward()
        for name, g in want["grads"].items():
            mine = cache.grads[name]
            if not gather and name.endswith(".z"):
                g = g[:, :, 2 * rank:2 * rank + 2]  # 2 of the 4 heads on each rank
            elif not gather and name.endswith(".mlp_post"):
                local = mine.shape[-1]
                g = torch.nn.functional.pad(g, (0, 2 * local - g.shape[-1]))[..., rank * local:(rank + 1) * local]
            assert mine.shape == g.shape and (mine - g).abs().max() < 1e-5, (name, gather)


def test_gradients_at_world_size_2_equal_one_process(tmp_path):
    """Each rank its slice of head and neuron points (the MLP's 171 hidden units padded to 172), full width
    with gather=True, the residual stream's gradient whole on every rank."""
    directory = save_hf(hf_llama("gqa", intermediate_size=171), tmp_path)
    model = zoo.load(directory, dtype=torch.float32)
    tokens = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(3))
    cache = hooks.collect("blocks.*.resid_pre", "blocks.0.z", "blocks.1.mlp_post", grads=True)
    logits = model(tokens, hooks=cache)
    (logits[:, -1, 5] - logits[:, -1, 9]).sum().backward()
    spawn(_check_world_2, 2, directory, {"tokens": tokens, "grads": dict(cache.grads.items())})


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_gradients_flow_through_kernels_without_a_backward(tiny_dir, scheme):
    """In bf16 the CPU's quantized matmuls are zoo's native kernels and torch's int8/int4 operators, which have
    no backward of their own: the gradient goes through the dequantized weight, near the bf16 float model's."""
    quantized = zoo.load(tiny_dir, dtype=torch.bfloat16, quant=scheme, group_size=64)
    dense = zoo.load(tiny_dir, dtype=torch.bfloat16)
    modules = dict(dense.named_modules())
    with torch.no_grad():
        for name, layer in quantized.named_modules():
            if isinstance(layer, QuantLinear):
                modules[name].weight.copy_(layer.dense_weight())
    got = []
    for model in (quantized, dense):
        cache = hooks.collect("blocks.*.resid_pre", grads=True)
        logits = model(TOKENS[:1, :6], hooks=cache)  # 6 rows: the kernels' small-M paths
        (logits[:, -1, 5] - logits[:, -1, 9]).sum().backward()
        got.append(cache.grads)
    for name in got[1]:
        want = got[1][name].float()
        assert (got[0][name].float() - want).abs().max() < 0.1 * want.abs().max(), name
