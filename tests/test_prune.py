"""zoo.prune: scores, selection, deletion through the weights (differential: equal to the same units ablated or
mean-replaced by hooks, on every family), the biases it adds load and run in transformers, the prune loop and its
command, and a real skill removed from the bundled model."""
import argparse
import json
from pathlib import Path

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


SKILLS = Path(__file__).parent / "data" / "skills"  # prose.txt (focus) and code.txt (cripple): make.py


def prune_args(*argv):
    p = argparse.ArgumentParser()
    zp.add_arguments(p)
    return p.parse_args(list(argv))


def test_split_and_evaluate(tiny_dir):
    windows = [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]]
    assert zp.split(windows, 0.4) == ([[1, 2], [3, 4], [7, 8]], [[5, 6], [9, 10]])
    model = zoo.load(tiny_dir, dtype=torch.float32)
    text = [model.tokenizer.encode("The for statement is used to iterate over the elements", bos=True)]
    r = zp.evaluate(model, [text[0], text[0][:4]], batch=2)  # a left-padded batch
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor(text))[0, :-1], -1)
    target = torch.tensor(text[0][1:])
    nll = -lp[torch.arange(len(target)), target]
    want_nll = torch.cat([nll, nll[:3]])
    top10 = (lp.topk(10).indices == target[:, None]).any(1)
    assert r["tokens"] == len(target) + 3
    assert abs(r["loss"] - want_nll.mean().item()) < 1e-5 and abs(r["ppl"] - want_nll.mean().exp().item()) < 1e-3
    assert r["top10"] == (top10.sum() + top10[:3].sum()).item() / r["tokens"]
    top1 = lp.argmax(-1) == target
    assert r["top1"] == (top1.sum() + top1[:3].sum()).item() / r["tokens"]


def test_prune_command(tiny_dir, tmp_path, capsys):
    """Two steps of neurons and heads with means folded in; the JSON; the pruned model saved as a Hugging Face
    checkpoint (LLaMA gains mlp_bias and attention_bias) that zoo and transformers load with the same logits."""
    out, saved = tmp_path / "prune.json", tmp_path / "pruned"
    args = prune_args(str(tiny_dir), "--focus", str(SKILLS / "prose.txt"), "--cripple", str(SKILLS / "code.txt"),
                      "--tokens", "300", "--eval-tokens", "200", "--ctx", "64", "--steps", "2", "--ff-frac", "0.01",
                      "--attn-frac", "0.05", "--offset", "mean", "--dtype", "float32", "--json", str(out),
                      "--out", str(saved))
    assert zp.command(args) == 0
    printed = capsys.readouterr().out
    assert "focus top1" in printed and "deleted per layer: neurons [" in printed
    steps = json.loads(out.read_text())["steps"]
    assert [s["step"] for s in steps] == [0, 1, 2]
    assert [s["neurons"] for s in steps] == [0, 46, 92] and [s["heads"] for s in steps] == [0, 2, 4]  # of 4608, 48
    assert sum(steps[2]["neurons_per_layer"]) == 92 and steps[1]["focus"]["tokens"] == steps[0]["focus"]["tokens"]
    model = zoo.load(saved, dtype=torch.float32)
    W = zoo.weights(model)
    assert sum(int((W[f"blocks.{i}.mlp.W_out"] == 0).all(1).sum()) for i in range(6)) == 92
    assert sum(int((W[f"blocks.{i}.attn.W_O"] == 0).flatten(1).all(1).sum()) for i in range(6)) == 4
    assert model.config.mlp_bias and model.config.attention_bias
    hf = transformers.AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    tokens = torch.tensor([model.tokenizer.encode("The for statement", bos=True)])
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max() < 1e-4
    with pytest.raises(ValueError, match="the output is the source checkpoint"):
        zp.command(prune_args(str(tiny_dir), "--focus", "f", "--cripple", "c", "--out", str(tiny_dir)))


def test_pruning_by_abs_removes_code_and_keeps_prose(tiny_dir):
    """The bundled model, focus prose, cripple code: 5% of the MLP neurons deleted by abs cost code's held-out
    top-1 accuracy several times what they cost prose's, and several times what as many random neurons cost."""
    model = zoo.load(tiny_dir, dtype=torch.float32)
    sets = [zp.split(zs.text_windows(model, SKILLS / f"{name}.txt", 3500, 128), 1500 / 3500)
            for name in ("prose", "code")]
    records = zp.prune(model, *sets, ff_frac=0.05, scoring="abs")
    base, pruned = records
    randomly = zoo.load(tiny_dir, dtype=torch.float32)
    scores = zp.score(None, None, "mlp_post", "rand", generator=torch.Generator().manual_seed(0), shape=(6, 768))
    zp.delete(randomly, neurons=zp.select(scores, 0.05))
    rand = {"focus": zp.evaluate(randomly, sets[0][1]), "cripple": zp.evaluate(randomly, sets[1][1])}
    drop = {name: {s: base[s]["top1"] - r[s]["top1"] for s in ("focus", "cripple")}
            for name, r in (("abs", pruned), ("rand", rand))}
    print(drop)
    assert pruned["neurons"] == round(0.05 * 6 * 768)
    assert drop["abs"]["cripple"] > 0.03
    assert drop["abs"]["cripple"] > 3 * max(drop["abs"]["focus"], 0.002)
    assert drop["abs"]["cripple"] > 2 * drop["rand"]["cripple"]


def rebuilt(directory, model):
    """A floating-point model holding `model`'s weights as its map reads them (dequantized)."""
    out = zoo.load(directory, dtype=torch.float32)
    R = zoo.weights(out)
    for name, t in zoo.weights(model).items():
        R[name] = t
    return out


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_quantized_model_prunes_after_it_ran_and_saves_quantized(directory, scheme, tmp_path):
    """On a quantized model (LLaMA, OPT, NeoX; int4 on the CPU lets its stored weight go at the first forward unless
    kept), deletion after forwards (as prune's statistics and evaluation run them) re-quantizes the edited rows
    with the deleted units' weights exact zeros: a float model rebuilt from the map is unchanged by ablating them
    with hooks, and the quantized forward is that rebuilt model's (within twice the kernels' rounding, what an
    unedited quantized model differs from its own rebuild); int8 (symmetric, so its other codes stay) is also
    close to ablating the units by hooks on the unedited model. The prune loop runs on it, and it saves in zoo's
    quantized format, which loads to the same logits. A model that let its int4 weights go is refused by name."""
    load = lambda: zoo.load(directory, dtype=torch.float32, quant=scheme, group_size=32)  # noqa: E731
    model, plain = load(), load()
    zp.keep_stored_weights(model)
    zp.keep_stored_weights(plain)
    neurons, heads = units(model)
    spec = {}
    for i in range(model.config.n_layers):
        spec[f"blocks.{i}.mlp_post"] = hooks.ablate(neurons=neurons[i].nonzero()[:, 0].tolist())
        spec[f"blocks.{i}.z"] = hooks.ablate(heads=heads[i].nonzero()[:, 0].tolist())
    want, before = logits(plain, spec), logits(model)
    zp.delete(model, neurons=neurons, heads=heads)
    got = logits(model)
    W = zoo.weights(model)
    for i in range(model.config.n_layers):
        assert (W[f"blocks.{i}.mlp.W_in"][:, neurons[i]] == 0).all() and (W[f"blocks.{i}.mlp.W_out"][neurons[i]] == 0).all()
        assert (W[f"blocks.{i}.attn.W_O"][heads[i]] == 0).all()
    edited, unedited = rebuilt(directory, model), rebuilt(directory, plain)
    assert (logits(edited, spec) - logits(edited)).abs().max() < 1e-5
    rounding = (logits(plain) - logits(unedited)).abs().max()
    assert (got - logits(edited)).abs().max() < 2 * rounding + 1e-4
    assert (want - before).abs().max() > 0.05
    if scheme == "int8":
        assert (got - want).abs().max() < 0.1 * (want - before).abs().max()

    records = zp.prune(load(), (WINDOWS[:2], WINDOWS[2:3]), (WINDOWS[1:3], WINDOWS[3:]), ff_frac=0.05, attn_frac=0.1,
                       steps=2, batch=2)
    assert [r["neurons"] for r in records][1:] == [round(0.05 * model.config.n_layers * model.config.d_mlp) * k
                                                   for k in (1, 2)]
    if scheme == "int4":
        ran = load()
        logits(ran)
        if any(m.quantized is None for m in ran.modules() if isinstance(m, zoo.quant.QuantLinear)):
            with pytest.raises(ValueError, match=r"blocks\.0\.\S+: this int4 layer let its stored weight go at the "
                                                 r"model's first forward, so pruning cannot edit it: load the model "
                                                 r"again"):
                zp.prune(ran, (WINDOWS[:2], WINDOWS[2:3]), (WINDOWS[1:3], WINDOWS[3:]))

    saved = tmp_path / "pruned"
    zoo.quant.save(model, saved, source=directory)
    again = zoo.load(saved, dtype=torch.float32)
    assert isinstance(again.blocks[0].mlp.w_in, zoo.quant.QuantLinear)
    assert (logits(again) - got).abs().max() < 1e-5


def test_prune_command_saves_a_quantized_model_in_zoos_format(tiny_dir, tmp_path):
    quantized, saved = tmp_path / "int4", tmp_path / "pruned"
    zoo.quant.save(zoo.load(tiny_dir, dtype=torch.float32, quant="int4"), quantized)
    args = prune_args(str(quantized), "--focus", str(SKILLS / "prose.txt"), "--cripple", str(SKILLS / "code.txt"),
                      "--tokens", "300", "--eval-tokens", "200", "--ctx", "64", "--ff-frac", "0.02",
                      "--dtype", "float32", "--json", str(tmp_path / "prune.json"), "--out", str(saved))
    assert zp.command(args) == 0
    model = zoo.load(saved, dtype=torch.float32)
    assert isinstance(model.blocks[0].mlp.w_out, zoo.quant.QuantLinear)
    W = zoo.weights(model)
    assert sum(int((W[f"blocks.{i}.mlp.W_out"] == 0).all(1).sum()) for i in range(6)) == round(0.02 * 6 * 768)
