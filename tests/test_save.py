"""zoo.save and `python -m zoo save`/`convert`: a Hugging Face checkpoint that transformers loads with the same
logits (fp32, 1e-5) and the same tensors as the checkpoint it came from, for every family and variant,
edits included, sharded with HF's index, written by rank 0 under tensor parallelism byte for byte as one
process writes it, and never where it could lose data."""
import json
import sys
import weakref

import pytest
import torch
import transformers
from helpers import (FAMILY_VARIANTS, LLAMA_VARIANTS, check_outcome, hf_family, hf_llama, save_hf, save_meta,
                     spawn_checks)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import zoo
from zoo import parallel
from zoo.models import FAMILIES, llama
from zoo.quant import QuantLinear

saving = sys.modules["zoo.save"]  # zoo.save is the function
TOL = 1e-5
TOKENS = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
VARIANTS = {**{f"llama-{v}": ("llama", v, {}) for v in LLAMA_VARIANTS},
            **{v: (family, v, {}) for v, (family, _) in FAMILY_VARIANTS.items()},
            "opt-untied": ("opt", "opt-pre-ln", dict(tie_word_embeddings=False)),
            "opt-no-final-norm": ("opt", "opt-pre-ln", dict(_remove_final_layer_norm=True)),
            "neox-tied": ("gpt_neox", "neox-rotary-0.25-parallel", dict(tie_word_embeddings=True))}


def hf_model(name: str):
    family, variant, more = VARIANTS[name]
    return hf_llama(variant, **more) if family == "llama" else hf_family(variant, **more)


def logits(model, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return out if isinstance(out, torch.Tensor) else out.logits


def from_pretrained(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def stored(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint directory, by key."""
    return {k: v for path in sorted(directory.glob("*.safetensors")) for k, v in load_file(path).items()}


def files(directory) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ---- config.json -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_to_hf_config_inverts_from_hf_config(name):
    """from_hf_config(to_hf_config(cfg)) == cfg (every field), and transformers reads the dict as the same model."""
    hf = hf_model(name)
    family = FAMILIES[hf.config.model_type]
    cfg = family.from_hf_config(hf.config.to_dict())
    written = family.to_hf_config(cfg)
    assert family.from_hf_config(written) == cfg
    assert json.loads(json.dumps(written)) == written  # plain JSON
    theirs = transformers.AutoConfig.for_model(**written)
    assert type(theirs) is type(hf.config)
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "tie_word_embeddings"):
        assert getattr(theirs, k) == getattr(hf.config, k), k
    assert getattr(theirs, "rope_parameters", None) == getattr(hf.config, "rope_parameters", None)


def test_meta_config_keeps_the_model(tmp_path):
    """A config from params.json (multiple_of, no hidden size) comes back with the same model-defining fields."""
    model = zoo.load(save_hf(hf_llama("gqa"), tmp_path / "hf"), dtype=torch.float32)
    meta = zoo.load(save_meta(model, tmp_path / "meta"), dtype=torch.float32).config
    again = llama.from_hf_config(llama.to_hf_config(meta))
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size", "norm_eps",
                  "rope_theta", "rope_scaling", "max_seq_len", "tie_embeddings"):
        assert getattr(again, field) == getattr(meta, field), field


# ---- every family: transformers loads it, with the same logits and tensors -------------------------------

@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_saved_checkpoint_loads_in_transformers_with_the_same_logits(name, tmp_path):
    hf = hf_model(name)
    src = save_hf(hf, tmp_path / "src")
    model = zoo.load(src, dtype=torch.float32)
    out = zoo.save(model, tmp_path / "out")
    assert out == (tmp_path / "out").resolve()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    want = logits(model)
    assert want.std() > 0.5
    theirs = from_pretrained(out)
    assert (logits(theirs) - want).abs().max() < TOL
    assert (logits(hf) - want).abs().max() < 1e-4
    # the same tensors, bit for bit, as transformers' own checkpoint (a tied output is not stored)
    ours, original = stored(out), stored(src)
    assert ours.keys() == original.keys()
    assert all(torch.equal(ours[k], original[k]) for k in ours)
    # and zoo reads it back identically
    again = zoo.load(out, dtype=torch.float32)
    assert torch.equal(logits(again), want)
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), again.state_dict().values()))
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and config["model_type"] == hf.config.model_type


def test_bf16_is_written_as_bf16(tmp_path):
    src = save_hf(hf_family("neox-rotary-0.25-parallel"), tmp_path / "src")
    model = zoo.load(src, dtype=torch.bfloat16)
    out = zoo.save(model, tmp_path / "out")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    again = zoo.load(out, dtype=torch.bfloat16)
    assert torch.equal(logits(again), logits(model))


@pytest.mark.parametrize("family", ["llama", "opt", "gpt_neox"])
def test_an_edit_through_the_model_map_is_saved(family, tmp_path):
    """zoo.weights' in-place edit of W_O reaches the file: transformers' logits are the edited model's."""
    name = {"llama": "llama-gqa", "opt": "opt-post-ln-proj", "gpt_neox": "neox-rotary-0.25-parallel"}[family]
    model = zoo.load(save_hf(hf_model(name), tmp_path / "src"), dtype=torch.float32)
    before = logits(model)
    zoo.weights(model)["blocks.0.attn.W_O"][1] = 0
    zoo.weights(model)["blocks.1.mlp.W_out"][:3] = 0
    edited = logits(model)
    assert (edited - before).abs().max() > 0.1
    out = zoo.save(model, tmp_path / "out")
    assert (logits(from_pretrained(out)) - edited).abs().max() < TOL
    assert torch.equal(logits(zoo.load(out, dtype=torch.float32)), edited)


# ---- files: safetensors as the reference writes it, shards with HF's index ----------------------------

def test_safetensors_file_is_byte_for_byte_the_reference_writers(tmp_path):
    tensors = {"b.w": torch.randn(3, 5), "a.x": torch.randn(7).to(torch.bfloat16),
               "c": torch.arange(6, dtype=torch.int64).reshape(2, 3), "d": torch.randn(2, 2).half()}
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    entries = saving.plan_shards([saving.Entry(k, [k], tuple(v.shape), v.dtype) for k, v in tensors.items()],
                                 1 << 30)["model.safetensors"]
    saving.write_safetensors(tmp_path / "ours.safetensors", entries, iter([(e.key, tensors[e.key]) for e in entries]),
                             {"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_sharded_with_hugging_faces_index(tmp_path):
    hf = hf_model("llama-tied-embeddings")
    src = save_hf(hf, tmp_path / "src")
    hf.save_pretrained(tmp_path / "theirs", max_shard_size="30KB")
    model = zoo.load(src, dtype=torch.float32)
    out = zoo.save(model, tmp_path / "out", max_shard_size="30KB")
    text = (out / "model.safetensors.index.json").read_text()
    index, theirs = json.loads(text), json.loads((tmp_path / "theirs" / "model.safetensors.index.json").read_text())
    assert text == json.dumps(index, indent=2, sort_keys=True) + "\n"  # as save_pretrained writes it
    assert index["metadata"] == theirs["metadata"] and index["weight_map"].keys() == theirs["weight_map"].keys()
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                          for i in range(1, len(shards) + 1)]
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", "model.safetensors.index.json", *shards])
    for shard in shards:  # at most 30 KB each, unless one tensor is larger
        keys = [k for k, f in index["weight_map"].items() if f == shard]
        size = sum(t.nbytes for k, t in load_file(out / shard).items())
        assert size <= 30_000 or len(keys) == 1, (shard, size)
        assert safe_open(out / shard, "pt").metadata()["format"] == "pt"
    assert (logits(from_pretrained(out)) - logits(model)).abs().max() < TOL
    assert torch.equal(logits(zoo.load(out, dtype=torch.float32)), logits(model))


def test_streaming_holds_one_tensor_at_a_time(tmp_path, monkeypatch):
    """Each tensor handed to the writer is let go before the next is made (the writer and the source keep none)."""
    model = zoo.load(save_hf(hf_model("llama-gqa"), tmp_path / "src"), dtype=torch.float32)
    made, real = [], saving._hf_tensors

    def tracked(*args):
        for key, t in real(*args):
            assert all(ref() is None for ref in made), key
            made.append(weakref.ref(t))
            yield key, t
            del t  # the writer asks for the next one: the last is its alone to let go
    monkeypatch.setattr(saving, "_hf_tensors", tracked)
    zoo.save(model, tmp_path / "out", max_shard_size="20KB")
    assert len(made) == len(stored(tmp_path / "out")) == 3 + 9 * model.config.n_layers
    assert len(list((tmp_path / "out").glob("*.safetensors"))) == 15


def test_bad_max_shard_size_and_format(tmp_path):
    model = zoo.load(save_hf(hf_model("llama-gqa"), tmp_path / "src"), dtype=torch.float32)
    for bad in (0, "0", "5 TB", "-1GB", 2.5, "GB"):
        with pytest.raises(ValueError, match=r"max_shard_size=.* is not accepted: a number of bytes > 0, or a size"):
            zoo.save(model, tmp_path / "out", max_shard_size=bad)
    with pytest.raises(ValueError, match=r"format='gguf' is not accepted: 'hf' \(Hugging Face's\) or 'zoo'"):
        zoo.save(model, tmp_path / "out", format="gguf")
    assert saving.shard_size("2GiB") == 2 << 30 and saving.shard_size("5GB") == 5 * 10**9
    assert saving.shard_size(" 100kb ") == 100_000 and saving.shard_size(1234) == saving.shard_size("1234") == 1234
    assert not (tmp_path / "out").exists()


# ---- never where it could lose data --------------------------------------------------------------------

def test_refuses_outputs_that_lose_data(tmp_path):
    """Over or inside the source (model.source), a directory with a file zoo did not write (with force too), a
    Hugging Face checkpoint zoo did not write: refused, nothing changed. Over its own checkpoint: only with force."""
    src = save_hf(hf_model("llama-gqa"), tmp_path / "src")
    model = zoo.load(src, dtype=torch.float32)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    before = files(tmp_path)
    refused = {src: "the output is the source checkpoint", src / "inner": "the output lies inside the source",
               tmp_path: "the output contains the source checkpoint",
               other: r"holds files zoo did not write \(notes.txt\)",
               tmp_path / "src" / "config.json": "the output lies inside the source checkpoint"}
    for out, why in refused.items():
        for force in (False, True):
            with pytest.raises(ValueError, match=why):
                zoo.save(model, out, force=force)
    assert files(tmp_path) == before
    hf_dir = save_hf(hf_model("opt-pre-ln"), tmp_path / "hf-written")  # not zoo's: never replaced
    before = files(tmp_path)
    with pytest.raises(ValueError, match=r"holds files zoo did not write \(config.json, generation_config.json, "
                                         r"model.safetensors\)"):
        zoo.save(model, hf_dir, force=True)
    assert files(tmp_path) == before
    out = zoo.save(model, tmp_path / "out", max_shard_size="20KB")
    with pytest.raises(ValueError, match=r"already holds a checkpoint zoo wrote \(config.json, model-00001-of-00015"
                                         r".safetensors, .*, and 12 more\); choose a new directory, or pass --force"):
        zoo.save(model, out)
    zoo.weights(model)["blocks.0.attn.W_O"][0] = 0
    assert zoo.save(model, out, force=True) == out  # 15 shards and the index replaced by one file
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(logits(zoo.load(out, dtype=torch.float32)), logits(model))
    (out / "mine.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files zoo did not write \(mine.txt\)"):
        zoo.save(model, out, force=True)
    assert (out / "mine.txt").read_text() == "mine"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    with pytest.raises(ValueError, match="the output is the source checkpoint"):  # source= adds, never lifts
        zoo.save(zoo.load(out, dtype=torch.float32), out, force=True, source=tmp_path / "elsewhere")


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    model = zoo.load(save_hf(hf_model("llama-gqa"), tmp_path / "src"), dtype=torch.float32)
    real = saving.write_safetensors

    def interrupted(path, *args):
        if path.name.startswith("model-00003"):
            raise KeyboardInterrupt
        real(path, *args)
    monkeypatch.setattr(saving, "write_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        zoo.save(model, tmp_path / "out", max_shard_size="20KB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_quantized_model_is_refused_for_hf_and_kept_in_zoos_format(tiny_dir, tmp_path, capsys):
    from zoo.__main__ import main
    model = zoo.load(tiny_dir, quant="int8")
    with pytest.raises(ValueError, match=r"the model has \d+ quantized layers \(blocks.0.attn.wq, ...\): a Hugging "
                                         r"Face checkpoint holds floating-point weights: save the model loaded "
                                         r"without quant="):
        zoo.save(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    out = zoo.save(model, tmp_path / "q", format="zoo")  # zoo.quant.save
    again = zoo.load(out)
    assert isinstance(again.blocks[0].attn.wq, QuantLinear)
    assert torch.equal(logits(again), logits(model))
    assert main(["save", str(out), str(tmp_path / "q-copy"), "--format", "zoo"]) == 0  # a quantized copy, re-checked
    copy, first = tmp_path / "q-copy" / "model.safetensors", out / "model.safetensors"
    assert safe_open(copy, "pt").metadata() == safe_open(first, "pt").metadata()  # (safetensors orders it at random)
    assert load_file(copy).keys() == load_file(first).keys()
    assert all(torch.equal(load_file(copy)[k], t) for k, t in load_file(first).items())
    for command, why in ((["convert", str(out), str(tmp_path / "hf")], "is a zoo-quantized checkpoint: a Hugging "
                          "Face checkpoint holds floating-point weights"),
                         (["save", str(tiny_dir), str(tmp_path / "z"), "--format", "zoo"], "is not quantized")):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and why in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "q-copy"]


# ---- the command: any layout zoo reads, written as Hugging Face's ----------------------------------------

def test_convert_meta_layout_gives_the_same_logits(tmp_path, capsys):
    """Meta's files (two model-parallel shards) -> HF: transformers' logits are zoo's from the Meta files."""
    from zoo.__main__ import main
    hf = hf_model("llama-gqa")
    meta = save_meta(zoo.load(save_hf(hf, tmp_path / "hf"), dtype=torch.float32), tmp_path / "meta", shards=2)
    assert main(["convert", str(meta), str(tmp_path / "out"), "--max-shard-size", "100KB"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {(tmp_path / 'out').resolve()}: ")
    want = logits(zoo.load(meta, dtype=torch.float32))
    assert (logits(from_pretrained(tmp_path / "out")) - want).abs().max() < TOL
    assert (logits(hf) - want).abs().max() < 1e-4
    ours, original = stored(tmp_path / "out"), stored(tmp_path / "hf")
    assert ours.keys() == original.keys() and all(torch.equal(ours[k], original[k]) for k in ours)


def test_convert_the_bundled_model_keeps_its_dtype_and_tokenizer(tiny_dir, tmp_path, capsys):
    """Meta's bf16 tiny-llama: written in bf16 (its embedding's dtype) with its tokenizer.model, or in fp32 on
    request; zoo reads the copy as the original, and transformers' fp32 logits are zoo's."""
    from zoo.__main__ import main
    assert main(["convert", str(tiny_dir), str(tmp_path / "bf16")]) == 0
    assert main(["save", str(tiny_dir), str(tmp_path / "fp32"), "--dtype", "float32"]) == 0
    assert "(hf, float32)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "bf16").iterdir()) == ["config.json", "model.safetensors",
                                                                     "tokenizer.model"]
    assert (tmp_path / "bf16" / "tokenizer.model").read_bytes() == (tiny_dir / "tokenizer.model").read_bytes()
    original, copy = zoo.load(tiny_dir), zoo.load(tmp_path / "bf16")
    ids = original.tokenizer.encode("The for statement iterates", bos=True)
    assert copy.tokenizer.encode("The for statement iterates", bos=True) == ids
    assert copy.embed.weight.dtype == torch.bfloat16
    assert all(torch.equal(p, q) for p, q in zip(original.state_dict().values(), copy.state_dict().values()))
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (original.tokenizer.bos_id, original.tokenizer.eos_id)
    want = logits(zoo.load(tiny_dir, dtype=torch.float32), torch.tensor([ids]))
    got = logits(from_pretrained(tmp_path / "fp32"), torch.tensor([ids]))
    assert (got - want).abs().max() <= TOL * want.abs().max()  # logits up to 17: relative


def test_convert_gpt_neox_and_metaseq_layouts(tmp_path):
    """gpt-neox's DeepSpeed files (MP=2, with its tokenizer.json) and metaseq's (MP=2, fused qkv) -> HF."""
    import tokenizers
    from pydoc_data.topics import topics
    from test_original import save_metaseq, save_neox

    from zoo.__main__ import main
    neox = save_neox(hf_family("neox-rotary-0.25-parallel"), tmp_path / "neox", mp=2)
    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train_from_iterator([topics[k] for k in sorted(topics)][:40], vocab_size=300,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tok.save(str(neox / "tokenizer.json"))
    opt = save_metaseq(hf_family("opt-post-ln-proj"), tmp_path / "opt", 2, True, "cfg")
    for src in (neox, opt):
        out = tmp_path / f"{src.name}-hf"
        assert main(["convert", str(src), str(out)]) == 0
        want = logits(zoo.load(src, dtype=torch.float32))
        assert (logits(from_pretrained(out)) - want).abs().max() < TOL, src.name
        assert torch.equal(logits(zoo.load(out, dtype=torch.float32)), want)
    text = "def f(x):\n    return x  # 42"
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "neox-hf")
    ours = zoo.load(tmp_path / "neox-hf").tokenizer
    assert theirs(text)["input_ids"] == ours.encode(text) == tok.encode(text).ids
    assert ours.eos_id == zoo.load(neox).tokenizer.eos_id == tok.token_to_id("<|endoftext|>")


def test_command_errors_are_one_line(tmp_path, capsys):
    from zoo.__main__ import main
    src = save_hf(hf_model("llama-gqa"), tmp_path / "src")
    capsys.readouterr()  # transformers' progress bars
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    cases = {("save", str(src), str(src)): "the output is the source checkpoint",
             ("convert", str(src), str(tmp_path / "other"), "--force"): "holds files zoo did not write (x)",
             ("convert", str(src), str(tmp_path / "o"), "--max-shard-size", "lots"): "max_shard_size='lots' is not",
             ("convert", str(tmp_path / "nowhere"), str(tmp_path / "o")): "checkpoint",
             ("save", str(src), str(tmp_path / "o"), "--format", "zoo"): "is not quantized"}
    for argv, why in cases.items():
        assert main(list(argv)) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and why in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


# ---- tensor parallelism: rank 0 writes what one process writes ------------------------------------------

def _check_tp_save(rank, dirs, outs, foreign):
    assert parallel.world_size() == 2
    for name, directory in dirs.items():
        model = zoo.load(directory, dtype=torch.float32)
        assert model.blocks[0].attn.wq.weight.shape[0] == model.config.n_heads * model.config.head_dim // 2
        out = zoo.save(model, outs[name], max_shard_size="40KB")
        assert out == outs[name].resolve()  # every rank returns the directory
    with pytest.raises(ValueError, match=r"holds files zoo did not write \(x\)"):  # every rank meets rank 0's error
        zoo.save(model, foreign, force=True)
    with pytest.raises(ValueError, match=r"the output is the source checkpoint"):
        zoo.save(model, directory)


def test_tensor_parallel_save_equals_one_process_byte_for_byte(tmp_path):
    """World size 2 (gloo): LLaMA with a vocabulary of 321 (split 161 + 160 and a padding row), tied LLaMA
    (vocabulary-parallel embedding), OPT with project_in/out, NeoX (fused qkv gathered per part): the files
    are the single process's, byte for byte."""
    dirs = {"llama-odd-vocab": save_hf(hf_llama("gqa", vocab_size=321), tmp_path / "llama-odd-vocab"),
            "llama-tied": save_hf(hf_model("llama-tied-embeddings"), tmp_path / "llama-tied"),
            "opt": save_hf(hf_model("opt-post-ln-proj"), tmp_path / "opt"),
            "neox": save_hf(hf_model("neox-rotary-1.0-sequential"), tmp_path / "neox")}
    one = {name: zoo.save(zoo.load(d, dtype=torch.float32), tmp_path / f"{name}-one", max_shard_size="40KB")
           for name, d in dirs.items()}
    outs = {name: tmp_path / f"{name}-tp" for name in dirs}
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x").write_text("x")
    results = tmp_path / "results"
    results.mkdir()
    spawn_checks({"save": (_check_tp_save, (dirs, outs, foreign))}, 2, results)
    check_outcome(results, "save", 2)
    for name in dirs:
        assert files(outs[name]) == files(one[name]), name
        assert len(list(outs[name].glob("*.safetensors"))) > 1, name
    assert sorted(p.name for p in foreign.iterdir()) == ["x"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_convert_under_torchrun(tmp_path):
    """`torchrun -m zoo convert`: each rank loads its shards, rank 0 writes the single process's files; an output
    that would lose data is one error line, exit status 2, and nothing is written."""
    import os
    import subprocess
    src = save_hf(hf_llama("gqa", vocab_size=321), tmp_path / "src")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x").write_text("x")

    def torchrun(out, *more):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "zoo",
               "convert", str(src), str(out), "--max-shard-size", "40KB", *more]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    done = torchrun(tmp_path / "tp")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("wrote ") == 1  # rank 0 says it
    one = zoo.save(zoo.load(src, dtype=torch.float32), tmp_path / "one", max_shard_size="40KB")
    assert files(tmp_path / "tp") == files(one)
    refused = torchrun(tmp_path / "foreign", "--force")
    assert refused.returncode != 0
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {(tmp_path / 'foreign').resolve()}: holds files zoo did not write (x); choose a new or "
                      f"empty directory (--force, force=True, replaces only a checkpoint zoo wrote and removes no "
                      f"other file)"], refused.stderr
    assert "exitcode  : 2" in refused.stderr, refused.stderr[-2000:]  # torchrun's report of the ranks' status
    assert sorted(p.name for p in (tmp_path / "foreign").iterdir()) == ["x"]
