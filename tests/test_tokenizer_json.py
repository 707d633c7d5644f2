"""tokenizer.json of every kind (zoo.tokenizer.HFTokenizer) against transformers' tokenizer on the same files.

Each tokenizer is trained here with Hugging Face `tokenizers` on a few lines of text and saved with a
tokenizer_config.json; the reference is transformers' AutoTokenizer on that directory.
"""
import json

import pytest
import torch
import transformers
from helpers import hf_llama, run_py, save_hf
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

import zoo
from zoo.tokenizer import HFTokenizer, load_tokenizer

TRAIN = ["The for statement is used to iterate over the elements of a sequence.",
         "Hello world, hello there: the theory of the thing, café au lait, naïve résumé.",
         "def f(x):\n    return x ** 2  # square; while True: pass",
         "Numbers 1234567 and 3.14159, dates 2024-01-01, UPPER lower MiXeD don't it's we'll."] * 3
TEXTS = ["Hello world", "  leading spaces and trailing   ", "tabs\tand\nnewlines\n\n\nmany", "digits 1234567 3.14159",
         "unicode: café naïve Ωmega ﬁ 中文 日本語 😀 👍🏽 🧪🧪", "e\u0301 decomposed, Å vs A\u030a", "", " ", "\n",
         "a" * 200, "<s>special</s> in text <extra one>x", "before <unk> after", "UPPER lower don't"]


def save(tok: Tokenizer, tmp_path, name: str, config: dict) -> str:
    directory = tmp_path / name
    directory.mkdir()
    tok.add_tokens([AddedToken("<extra one>")])  # an added token that is not special
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def sentencepiece_bpe(tmp_path):
    """LLaMA 2 as transformers 5 writes it: Metaspace, BPE with byte fallback (<0x00>..<0xFF> in the vocab)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.ByteFallback(),
                                     decoders.Metaspace(replacement="▁", prepend_scheme="first")])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(TRAIN, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False))
    spec = json.loads(tok.to_str())  # the byte tokens belong in the vocabulary, not among the added tokens
    spec["added_tokens"] = spec["added_tokens"][:3]
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return save(tok, tmp_path, "sp-bpe", {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})


def byte_level_bpe(tmp_path):
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()  # as GPT-NeoX's
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TRAIN, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<unk>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return save(tok, tmp_path, "byte-bpe", {"bos_token": "<s>", "eos_token": "</s>"})


def unigram(tmp_path):
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(TRAIN, trainers.UnigramTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"],
                                                           unk_token="<unk>", show_progress=False))
    return save(tok, tmp_path, "unigram", {"bos_token": "<s>", "eos_token": "</s>"})


def wordpiece(tmp_path):
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(TRAIN, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", "[CLS]", "[SEP]"],
                                                             show_progress=False))
    return save(tok, tmp_path, "wordpiece", {"bos_token": "[CLS]", "eos_token": "[SEP]", "add_bos_token": False})


@pytest.mark.parametrize("build", [sentencepiece_bpe, byte_level_bpe, unigram, wordpiece])
def test_encode_decode_match_transformers(build, tmp_path):
    directory = build(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(directory)
    tok = load_tokenizer(directory)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id) == (ref.bos_token_id, ref.eos_token_id)
    assert tok.stop_ids == {ref.eos_token_id} and tok.n_words == len(ref)
    for text in TEXTS:
        want = ref.encode(text, add_special_tokens=False)
        assert tok.encode(text) == want, text
        assert tok.decode(want) == ref.decode(want), text
        assert tok.decode(want + [tok.eos_id]) == ref.decode(want + [tok.eos_id]), text
    assert tok.encode("x <extra one>").count(ref.convert_tokens_to_ids("<extra one>")) == 1
    assert tok.decode([tok.n_words + 5]) == ""  # a padded embedding's id past the vocabulary: nothing


def test_sentencepiece_bpe_bos_and_byte_fallback(tmp_path):
    directory = sentencepiece_bpe(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(directory)
    tok = load_tokenizer(directory)
    for text in TEXTS:
        assert tok.encode(text, bos=True) == ref.encode(text), text  # its post-processor adds <s>
    ids = tok.encode("中文 😀")
    assert {f"<0x{b:02X}>" for b in "中".encode()} <= set(ref.convert_ids_to_tokens(ids))  # not in the vocabulary
    assert tok.decode(ids) == "中文 😀" and tok.decode(tok.encode("Hello world")) == "Hello world"
    assert tok.decode(ids[:-1]).endswith("\ufffd")  # a partial character, which zoo.stream holds back
    wordpiece_dir = wordpiece(tmp_path)  # add_bos_token false: encode(bos=True) adds none, as transformers
    assert load_tokenizer(wordpiece_dir).encode("hello", bos=True) == \
        transformers.AutoTokenizer.from_pretrained(wordpiece_dir).encode("hello", add_special_tokens=False)


def test_llama_checkpoint_with_only_tokenizer_json(tmp_path):
    """A LLaMA 2 style checkpoint as transformers 5 writes it: config.json, model.safetensors, tokenizer.json."""
    tokenizer_dir = sentencepiece_bpe(tmp_path)
    vocab = len(Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab())
    directory = save_hf(hf_llama(vocab_size=vocab, bos_token_id=1, eos_token_id=2), tmp_path / "llama")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((tokenizer_dir / name).read_bytes())
    assert not (directory / "tokenizer.model").exists()
    model = zoo.load(directory, dtype=torch.float32)
    ref = transformers.AutoTokenizer.from_pretrained(directory)
    prompt = model.tokenizer.encode("Hello world, café 😀", bos=True)
    assert prompt == ref.encode("Hello world, café 😀")
    new = zoo.generate(model, [prompt], max_new_tokens=5)[0]
    assert 0 < len(new) <= 5 and all(0 <= t < vocab for t in new)
    assert isinstance(model.tokenizer.decode(new), str)  # random weights: any tokens, byte tokens too
    status, out, err = run_py("--ckpt", str(directory), "--prompt", "Hello world", "--max-new-tokens", "4")
    assert status == 0, err


@pytest.mark.parametrize("content, message", [
    (b"{not json", r"tokenizer.json: not valid JSON"),
    (b'{"model": {"type": "Nope"}}', r"tokenizer.json: not a tokenizer.json that Hugging Face tokenizers reads \("),
    (b'{"version": "1.0", "model": {"type": "Unigram", "vocab": 5}}', r"tokenizer.json: not a tokenizer.json that"),
    (b'{"model": {"type": "WordPiece", "vocab": {"a": "b"}}}', r"tokenizer.json: the vocabulary should map tokens"),
])
def test_a_bad_tokenizer_json_is_one_line_naming_it(tmp_path, content, message):
    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(zoo.CheckpointError, match=message) as error:
        load_tokenizer(tmp_path)
    assert "\n" not in str(error.value) and str(tmp_path / "tokenizer.json") in str(error.value)


def test_a_special_token_not_in_the_vocabulary(tmp_path):
    directory = byte_level_bpe(tmp_path)
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>", "add_bos_token": "yes"}))
    with pytest.raises(zoo.CheckpointError, match=r"tokenizer_config.json: add_bos_token 'yes' is not true or false"):
        load_tokenizer(directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(zoo.CheckpointError, match=r"tokenizer.json: special token '<\|nope\|>' is not in the tok"):
        load_tokenizer(directory)


@pytest.mark.parametrize("build", [sentencepiece_bpe, byte_level_bpe, unigram, wordpiece])
def test_clean_up_tokenization_spaces_as_transformers(build, tmp_path):
    """tokenizer_config.json's clean_up_tokenization_spaces: transformers 5 applies it to every model but BPE."""
    directory = build(tmp_path)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
    ref = transformers.AutoTokenizer.from_pretrained(directory)
    tok = load_tokenizer(directory)
    assert tok.clean_up_spaces == (build in (unigram, wordpiece))
    for text in TEXTS + ["Hello , world . Is it ? Yes ! don ' t , it 's , we 're , I 'm , they 've , isn't"]:
        ids = ref.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == ref.decode(ids), text
    if build is wordpiece:  # its decoder joins word pieces with spaces: the clean-up is what removes them
        assert tok.decode(tok.encode("hello, world.")) == "hello, world."
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": "yes"}))
    with pytest.raises(zoo.CheckpointError, match=r"tokenizer_config.json: clean_up_tokenization_spaces 'yes' is not"):
        load_tokenizer(directory)
