"""zoo.prune: scores, selection, deletion through the weights (differential: equal to the same units ablated or
mean-replaced by hooks, on every family), the biases it adds load and run in transformers, the prune loop and its
command, and a real skill removed from the bundled model."""
import pytest
import torch
import transformers
from helpers import hf_family, hf_llama, save_hf

import zoo
from zoo import hooks
from zoo import prune as zp
from zoo import stats as zs
from zoo.models import llama

VARIANTS = ["llama-gqa", "opt-pre-ln", "neox-rotary-0.25-parallel", "neox-rotary-1.0-sequential"]
WINDOWS = [torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (11, 6, 9, 3)]
TOKENS = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(0))


def build(variant, **more):
    return hf_llama("gqa", **more) if variant.startswith("llama") else hf_family(variant, **more)


@pytest.fixture(scope="module", params=VARIANTS)
def directory(request, tmp_path_factory):
    return save_hf(build(request.param), tmp_path_factory.mktemp(request.param))


def logits(model, spec=None):
    with torch.no_grad():
        return model(TOKENS, hooks=spec)


def units(model, seed=0):
    """Some neurons and heads of every layer, as delete() takes them."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return torch.rand(c.n_layers, c.d_mlp, generator=g) < 0.1, torch.rand(c.n_layers, c.n_heads, generator=g) < 0.3


def replacing(index: list[int], values: torch.Tensor):
    """A hook setting the neurons (mlp_post) or heads (z) `index` to `values` at every position."""
    def fn(x, ctx):
        x = x.clone()
        x[:, :, index] = values.to(x.dtype)
        return x
    return fn


def test_deletion_equals_zero_ablation_by_hooks(directory):
    model = zoo.load(directory, dtype=torch.float32)
    neurons, heads = units(model)
    spec = {}
    for i in range(model.config.n_layers):
        spec[f"blocks.{i}.mlp_post"] = hooks.ablate(neurons=neurons[i].nonzero()[:, 0].tolist())
        spec[f"blocks.{i}.z"] = hooks.ablate(heads=heads[i].nonzero()[:, 0].tolist())
    want = logits(model, spec)
    assert (want - logits(model)).abs().max() > 1e-2  # the units matter
    zp.delete(model, neurons=neurons, heads=heads)
    assert (logits(model) - want).abs().max() < 1e-5
    W = zoo.weights(model)
    assert (W["blocks.0.mlp.W_in"][:, neurons[0]] == 0).all() and (W["blocks.1.attn.W_O"][heads[1]] == 0).all()


def test_deletion_with_means_equals_replacing_by_the_means(directory):
    model = zoo.load(directory, dtype=torch.float32)
    neurons, heads = units(model, seed=1)
    means = zs.collect_stats(model, WINDOWS, batch=2)
    spec, indices = {}, []
    for i in range(model.config.n_layers):
        js, hs = neurons[i].nonzero()[:, 0].tolist(), heads[i].nonzero()[:, 0].tolist()
        indices += [js, hs]
        spec[f"blocks.{i}.mlp_post"] = replacing(js, means["mlp_post.mean"][i, js])
        spec[f"blocks.{i}.z"] = replacing(hs, means["z.mean"][i, hs])
    want = logits(model, spec)
    zeroed = {name: replacing(index, torch.zeros(())) for name, index in zip(spec, indices)}
    assert (want - logits(model, zeroed)).abs().max() > 1e-2  # the means differ from zero ablation
    zp.delete(model, neurons=neurons, heads=heads, means=means)
    assert (logits(model) - want).abs().max() < 1e-5


def test_added_biases_load_in_zoo_and_transformers(tmp_path):
    """LLaMA has no biases: offset means sets mlp_bias and attention_bias, and the pruned weights under those
    flags, written as a Hugging Face checkpoint, give the pruned model's logits in transformers and in zoo."""
    hf = hf_llama("gqa")
    model = zoo.load(save_hf(hf, tmp_path / "src"), dtype=torch.float32)
    neurons, heads = units(model, seed=2)
    zp.delete(model, neurons=neurons, heads=heads, means=zs.collect_stats(model, WINDOWS, batch=2))
    assert model.config.mlp_bias and model.config.attention_bias
    assert model.blocks[0].mlp.w_out.bias.abs().max() > 0 and model.blocks[0].mlp.w_in.bias.abs().max() == 0
    pruned = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**hf.config.to_dict(), "mlp_bias": True,
                                                                        "attention_bias": True})).eval()
    state = {llama.zoo_to_hf(n): llama.zoo_tensor_to_hf(n, p, model.config) for n, p in model.named_parameters()}
    assert sorted(state) == sorted(pruned.state_dict())
    pruned.load_state_dict(state)
    want = logits(model)
    with torch.no_grad():
        assert (pruned(TOKENS).logits - want).abs().max() < 1e-4
    assert (logits(zoo.load(save_hf(pruned, tmp_path / "pruned"), dtype=torch.float32)) - want).abs().max() < 1e-5


def test_scores_and_selection():
    focus = {"mlp_post.mean_abs": torch.tensor([[1.0, 2.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64),
             "mlp_post.mean": torch.zeros(2, 3, dtype=torch.float64), "mlp_post.std": torch.ones(2, 3)}
    cripple = {"mlp_post.mean_abs": torch.tensor([[2.0, 2.0, 1.0], [3.0, 0.5, 1.0]], dtype=torch.float64),
               "mlp_post.mean": torch.tensor([[1.0, -2.0, 0.0], [0.0, 0.0, 0.5]]), "mlp_post.std": torch.ones(2, 3)}
    s = zp.score(focus, cripple, "mlp_post", "abs")
    assert torch.allclose(s, torch.tensor([[2.0, 1.0, 1e6], [3.0, 0.5, 1.0]], dtype=torch.float64), rtol=1e-5)
    assert zp.select(s, 2 / 6).tolist() == [[False, False, True], [True, False, False]]
    assert zp.select(s, 2 / 6, deleted=zp.select(s, 1 / 6)).tolist() == [[True, False, False], [True, False, False]]
    assert zp.score(focus, cripple, "mlp_post", "mean").tolist() == [[1.0, 2.0, 0.0], [0.0, 0.0, 0.5]]
    rms = zp.score(focus, cripple, "mlp_post", "rms")
    assert torch.allclose(rms[0, 0], torch.tensor(2.0, dtype=torch.float64).sqrt() / (1 + 1e-6))
    r = zp.score(None, None, "mlp_post", "rand", generator=torch.Generator().manual_seed(0), shape=(2, 3))
    assert r.shape == (2, 3) and zp.select(r, 0.5).sum() == 3
    dims = torch.tensor([[[1.0, 2.0, 9.0], [3.0, 3.0, 3.0]]])
    assert zp.head_scores(dims, "mean").tolist() == [[4.0, 3.0]] and zp.head_scores(dims, "median").tolist() == [[2.0, 3.0]]
    with pytest.raises(ValueError, match="scoring='l2' is not accepted"):
        zp.score(focus, cripple, "mlp_post", "l2")
