"""The tokenizer formats against the reference encoders of the same vocabularies (every kind of tokenizer.json:
test_tokenizer_json.py)."""
import base64
import json

import pytest

from zoo.bpe import byte_decoder
from zoo.tokenizer import (LLAMA3_PATTERN, BPETokenizer, HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer,
                           load_tokenizer)

TEXTS = [
    "Hello world", "  leading spaces and trailing   ", "tabs\tand\nnewlines\n\n\nmany", "digits 1234567 3.14159 1e-5",
    "def f(x):\n    return x ** 2  # square", "unicode: café naïve 中文 日本語 😀 👍🏽", "UPPER lower MiXeD don't it's we'll",
    "", " ", "\n", "a" * 300, "<|begin_of_text|> is text here",
]


@pytest.fixture(scope="module")
def hf_bpe(tmp_path_factory):
    """A byte-level BPE trained here with Hugging Face `tokenizers`, LLaMA 3 style pre-tokenization."""
    import tokenizers
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from pydoc_data.topics import topics
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                             special_tokens=["<|begin_of_text|>", "<|end_of_text|>"])
    tok.train_from_iterator([topics[k] for k in sorted(topics)][:60], trainer)
    directory = tmp_path_factory.mktemp("bpe")
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                                 "eos_token": {"content": "<|end_of_text|>"}}))
    return tok, directory


def test_bpe_tokenizer_json_matches_hf(hf_bpe):
    reference, directory = hf_bpe
    tok = load_tokenizer(directory)
    assert isinstance(tok, HFTokenizer)
    assert tok.bos_id == reference.token_to_id("<|begin_of_text|>") and tok.eos_id == reference.token_to_id("<|end_of_text|>")
    for text in TEXTS:
        assert tok.encode(text) == reference.encode(text).ids, text
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("x", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id


def test_llama3_tiktoken_file_matches_same_vocab(hf_bpe, tmp_path):
    """The same vocabulary written as LLaMA 3's tokenizer.model (base64 token, rank): ids shift by the 2 specials."""
    reference, directory = hf_bpe
    to_byte = byte_decoder()
    specials = {reference.token_to_id("<|begin_of_text|>"), reference.token_to_id("<|end_of_text|>")}
    token_of = {i: t for t, i in reference.get_vocab().items() if i not in specials}
    lines = [f"{base64.b64encode(bytes(to_byte[c] for c in token_of[i])).decode()} {rank}"
             for rank, i in enumerate(sorted(token_of))]
    (tmp_path / "tokenizer.model").write_text("\n".join(lines) + "\n")
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, TiktokenTokenizer)
    n = len(lines)
    assert (tok.bos_id, tok.eos_id) == (n, n + 1)
    assert tok.stop_ids == {n + 1, n + 9}  # <|end_of_text|>, <|eot_id|>
    assert tok.n_words == n + 256
    for text in TEXTS:
        want = [i - 2 for i in reference.encode(text).ids] if "<|" not in text else None
        got = tok.encode(text)
        if want is not None:
            assert got == want, text
        assert tok.decode(got) == text  # special-token text is encoded as plain text, as Meta does
    assert tok.decode([tok.bos_id]) == "<|begin_of_text|>"
    long = "a" * 60_000 + " " * 30_000 + "b."  # runs over 25k characters are cut before encoding
    assert tok.decode(tok.encode(long)) == long


def test_sentencepiece(tiny_dir):
    from sentencepiece import SentencePieceProcessor
    sp = SentencePieceProcessor(model_file=str(tiny_dir / "tokenizer.model"))
    tok = load_tokenizer(tiny_dir)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.n_words) == (sp.bos_id(), sp.eos_id(), sp.vocab_size())
    for text in TEXTS:
        assert tok.encode(text) == sp.encode(text)
        assert tok.encode(text, bos=True, eos=True) == [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]
    text = "The for statement is used to iterate over the elements of a sequence."
    assert tok.decode(tok.encode(text, bos=True)) == text


def test_no_tokenizer_is_none(tmp_path):
    assert load_tokenizer(tmp_path) is None


@pytest.fixture(scope="module")
def gpt2_bpe(tmp_path_factory):
    """A GPT-2 style byte-level BPE (as OPT and Pythia ship them), trained here with `tokenizers`."""
    import tokenizers
    from pydoc_data.topics import topics
    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train_from_iterator([topics[k] for k in sorted(topics)][:80], vocab_size=900,
                            special_tokens=["<|endoftext|>", "<pad>"], show_progress=False)
    tok.add_tokens(["<added one>"])
    directory = tmp_path_factory.mktemp("gpt2")
    tok.save_model(str(directory))  # vocab.json + merges.txt
    tok.save(str(directory / "tokenizer.json"))
    return tok, directory


MORE_TEXTS = TEXTS + ["   x  =  [1,2,3]\r\n\tyield  from  g()", "ﬁ ligatures, Ωmega, 🧪🧪🧪, naïve—dash", "x" * 5 + " 2024-01-01T00:00",
                      "a <added one> b<added one>c"]  # a token added to tokenizer.json: not in vocab.json


def test_gpt2_vocab_merges_and_tokenizer_json_match_hf(gpt2_bpe, tmp_path):
    reference, directory = gpt2_bpe
    from_json = HFTokenizer(directory / "tokenizer.json", eos="<|endoftext|>")
    for f in ("vocab.json", "merges.txt"):
        (tmp_path / f).write_bytes((directory / f).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "added_tokens_decoder": {"0": {"content": "<|endoftext|>"}}}))
    from_files = load_tokenizer(tmp_path)
    assert isinstance(from_files, BPETokenizer) and from_files.eos_id == reference.token_to_id("<|endoftext|>")
    for text in MORE_TEXTS:
        want = reference.encode(text).ids
        assert from_json.encode(text) == want, text
        assert from_json.decode(want) == reference.decode(want, skip_special_tokens=False)
        if "<added one>" not in text:  # vocab.json + merges.txt do not hold added tokens
            assert from_files.encode(text) == want, text
    added = reference.token_to_id("<added one>")
    assert from_json.encode("a <added one> b").count(added) == 1  # added tokens are split out whole
    assert added not in from_files.encode("a <added one> b")


def test_metaseq_dict_renumbers_gpt2_ids(gpt2_bpe, tmp_path):
    """fairseq's dict.txt: model id = 4 + the line of the GPT-2 id; ids it lacks become <unk> (3)."""
    import random
    reference, directory = gpt2_bpe
    (tmp_path / "gpt2-vocab.json").write_bytes((directory / "vocab.json").read_bytes())
    (tmp_path / "gpt2-merges.txt").write_bytes((directory / "merges.txt").read_bytes())
    gpt2_ids = sorted(json.loads((directory / "vocab.json").read_text()).values())
    kept = random.Random(0).sample(gpt2_ids, k=len(gpt2_ids) * 9 // 10)  # shuffled, a tenth left out
    (tmp_path / "dict.txt").write_text("".join(f"{i} {1000 - n}\n" for n, i in enumerate(kept)) + "madeupword0000 0\n")
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (2, 2)
    line = {i: n for n, i in enumerate(kept)}
    unknown = decoded = 0
    for text in MORE_TEXTS:
        if "<added one>" in text:
            continue
        want = [4 + line[i] if i in line else 3 for i in reference.encode(text).ids]
        unknown += want.count(3)
        assert tok.encode(text, bos=True, eos=True) == [2, *want, 2], text
        if 3 not in want:
            assert tok.decode(want) == text
            decoded += 1
    assert unknown > 0 and decoded > 3  # the left-out tenth is hit, and texts without it round-trip
