"""A checkpoint's own chat template: the ids zoo renders and encodes against transformers' apply_chat_template
on the same files, zoo.Chat's cache reuse with a template (a template that renders a reply otherwise than it
was generated included), the sandbox and a template's errors, and the fallback to LLaMA 2's format.

The templates in tests/data/chat_templates are the Hub's, cut to what these messages reach: Qwen2.5's ChatML
(a default system message, the tools branch with tojson), Llama 3.1's (bos_token, strftime_now, trim),
Meta Llama 3's, Mistral v0.3's [INST] (raise_exception for role alternation; the system message joins
the last user message, so each turn renders the earlier ones anew), Gemma's (assistant -> model; a system
message raises), Meta's LLaMA 2 chat and DeepSeek R1's (a namespace; the generation prompt opens <think>,
a reply in the history loses its thinking).
"""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from helpers import FAMILY_VARIANTS, hf_family, hf_llama, run_py, save_hf
from sentencepiece import SentencePieceProcessor
from test_chat import llama3_ranks, turn, write_tiktoken
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import zoo
from zoo.chat import LLAMA3_CHAT_TOKENS, Llama2Format, Llama3Format, TemplateFormat, chat_format
from zoo.models import FAMILIES
from zoo.tokenizer import load_tokenizer

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
SPECIALS = ["<s>", "</s>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<bos>", "<eos>", "<start_of_turn>",
            "<end_of_turn>", "<|User|>", "<|Assistant|>", "<think>", "</think>"]
TRAIN = ["You are a helpful assistant. What does the for statement do? It loops over the items of a sequence.",
         "Be brief. Hello! How are you? Why? Because the user asked. system user assistant model"] * 4
SYSTEM = {"role": "system", "content": "Be brief <b>&</b>."}
DIALOGUE = [SYSTEM, {"role": "user", "content": "  Hi there, café 中文 😀\n"}, {"role": "assistant", "content": "Hello! "},
            {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "\nBecause.\n"},
            {"role": "user", "content": "What does the for statement do?"}]
# (template, tokenizer, the special tokens of its tokenizer_config.json)
CASES = {
    "qwen2": ("qwen2", "byte", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}),
    "llama3": ("llama3", "byte", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "mistral": ("mistral", "metaspace", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
    "gemma": ("gemma", "byte", {"bos_token": "<bos>", "eos_token": "<eos>"}),
    "llama2": ("llama2", "metaspace", {"bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False,
                                                     "normalized": False, "rstrip": False, "single_word": False},
                                       "eos_token": "</s>"}),  # as Meta's Hub files write the bos
    "deepseek_r1": ("deepseek_r1", "byte", {"bos_token": "<s>", "eos_token": "</s>"}),
}


def tokenizer_json(kind: str) -> Tokenizer:
    """A BPE trained on TRAIN with every SPECIALS token: byte-level (GPT-2's, Qwen's, LLaMA 3's kind), or
    SentencePiece-style (Metaspace with byte fallback: LLaMA 2's and Mistral's as transformers 5 writes them)."""
    if kind == "byte":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first")])
        alphabet = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(TRAIN, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=alphabet if kind == "byte" else []))
    if kind != "byte":  # the byte tokens join the vocabulary (not the added tokens), as in LLaMA 2's file
        spec = json.loads(tok.to_str())
        spec["model"]["vocab"] |= {b: len(spec["model"]["vocab"]) + i for i, b in enumerate(alphabet)}
        tok = Tokenizer.from_str(json.dumps(spec))
    return tok


def write_checkpoint(directory: Path, case: str, with_model: bool | str = False, **config) -> Path:
    """A tokenizer.json and tokenizer_config.json (its chat_template from TEMPLATES) for `case`, with a random
    LLaMA (bos and eos ids the tokenizer's) where `with_model` (a helpers.FAMILY_VARIANTS name: a model of that
    variant); `config`: more tokenizer_config.json keys."""
    template, kind, special = CASES[case]
    directory.mkdir(parents=True)
    tok = tokenizer_json(kind)
    tok.save(str(directory / "tokenizer.json"))
    content = lambda t: t["content"] if isinstance(t, dict) else t  # noqa: E731
    if with_model:
        ids = {f"{name}_id": tok.token_to_id(content(special[name])) for name in ("bos_token", "eos_token")
               if special.get(name)}
        model = hf_family(with_model, vocab_size=512, **ids) if isinstance(with_model, str) else \
            hf_llama("gqa", vocab_size=512, max_position_embeddings=1024, **ids)
        save_hf(model, directory)
    text = (TEMPLATES / f"{template}.jinja").read_text()
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": text, **special, **config}))
    return directory


def transformers_ids(directory: Path, messages: list[dict]) -> list[int]:
    # the tokenizer.json as written (AutoTokenizer would take GemmaTokenizer for a Gemma config.json, which
    # rebuilds the test's byte-level tokenizer as Gemma's own kind)
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(directory)
    return ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]


# ---- the rendered ids equal transformers' -----------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_rendered_ids_equal_transformers(case, tmp_path):
    directory = write_checkpoint(tmp_path / case, case)
    fmt = chat_format(load_tokenizer(directory))
    assert isinstance(fmt, TemplateFormat)
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    dialogues = [DIALOGUE[1:2], DIALOGUE[1:], DIALOGUE] if case != "gemma" else [DIALOGUE[1:2], DIALOGUE[1:]]
    for messages in dialogues:  # one user message, then multi-turn without and with a system message
        want = transformers_ids(directory, messages)
        assert fmt.prompt(messages) == want
        assert all(m["content"].strip() in tok.decode(want, skip_special_tokens=False) for m in messages)
    special = tok.encode(fmt.text(DIALOGUE[1:])).ids  # the special tokens were rendered and encoded as themselves
    assert [tok.id_to_token(i) for i in special if tok.id_to_token(i) in SPECIALS] == {
        "qwen2": ["<|im_start|>", "<|im_end|>"] * 6 + ["<|im_start|>"],
        "llama3": ["<|begin_of_text|>"] + ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"] * 6
                  + ["<|start_header_id|>", "<|end_header_id|>"],
        "mistral": ["<s>", "</s>", "</s>"], "llama2": ["<s>", "</s>", "<s>", "</s>", "<s>"],
        "gemma": ["<bos>"] + ["<start_of_turn>", "<end_of_turn>"] * 5 + ["<start_of_turn>"],
        "deepseek_r1": ["<s>", "<|User|>", "<|Assistant|>", "</s>", "<|User|>", "<|Assistant|>", "</s>", "<|User|>",
                        "<|Assistant|>", "<think>"],
    }[case]


def test_chat_template_jinja_and_named_templates(tmp_path):
    """transformers 5's chat_template.jinja comes before tokenizer_config.json's; a list's "default" is the one used."""
    directory = write_checkpoint(tmp_path / "jinja", "qwen2", chat_template="{{ raise_exception('not this one') }}")
    shutil.copy(TEMPLATES / "gemma.jinja", directory / "chat_template.jinja")
    fmt = chat_format(load_tokenizer(directory))
    assert fmt.template.source == str(directory / "chat_template.jinja")
    assert fmt.prompt(DIALOGUE[1:]) == transformers_ids(directory, DIALOGUE[1:])
    assert "<start_of_turn>model\n" in fmt.text(DIALOGUE[1:])
    named = [{"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
             {"name": "default", "template": (TEMPLATES / "qwen2.jinja").read_text()}]
    directory = write_checkpoint(tmp_path / "named", "qwen2", chat_template=named)
    fmt = chat_format(load_tokenizer(directory))
    assert fmt.template.source == f'{directory / "tokenizer_config.json"} (chat_template "default")'
    assert fmt.prompt(DIALOGUE) == transformers_ids(directory, DIALOGUE)


def test_a_sentencepiece_tokenizer_model_with_a_template(tiny_dir, tmp_path):
    """The Hub's LLaMA 2 chat: tokenizer.model with Meta's template in tokenizer_config.json. The rendered text is
    transformers' (its renderer); "<s>" and "</s>" in it are bos and eos, the text between encoded piece by
    piece by sentencepiece itself."""
    from transformers.utils.chat_template_utils import render_jinja_template
    shutil.copy(tiny_dir / "tokenizer.model", tmp_path)
    text = (TEMPLATES / "llama2.jinja").read_text()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": text, "bos_token": "<s>",
                                                                "eos_token": "</s>", "unk_token": "<unk>"}))
    fmt = chat_format(load_tokenizer(tmp_path))
    rendered = render_jinja_template([DIALOGUE], chat_template=text, add_generation_prompt=True, bos_token="<s>",
                                     eos_token="</s>", unk_token="<unk>")[0][0]
    assert fmt.text(DIALOGUE) == rendered
    sp = SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    bos, eos = 1, 2
    assert fmt.prompt(DIALOGUE) == (
        [bos] + sp.encode("[INST] <<SYS>>\nBe brief <b>&</b>.\n<</SYS>>\n\n  Hi there, café 中文 😀 [/INST] Hello! ")
        + [eos, bos] + sp.encode("[INST] Why? [/INST] Because. ") + [eos, bos]
        + sp.encode("[INST] What does the for statement do? [/INST]"))
    assert fmt.prompt(DIALOGUE) == Llama2Format(fmt.tokenizer).prompt(DIALOGUE)  # Meta's template is its own format
    assert fmt.stop_ids == {eos}


def test_a_tiktoken_tokenizer_model_with_a_template(tmp_path):
    """LLaMA 3's tokenizer.model with Meta Llama 3 Instruct's template: its special tokens rendered as text are
    those tokens, and the ids are Meta's ChatFormat's (zoo's own LLaMA 3 format)."""
    write_tiktoken(llama3_ranks(), tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": (TEMPLATES / "llama3_0.jinja").read_text(), "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>"}))
    tokenizer = load_tokenizer(tmp_path)
    fmt = chat_format(tokenizer)
    assert isinstance(fmt, TemplateFormat) and fmt.prompt(DIALOGUE) == Llama3Format(tokenizer, {
        name: tokenizer.model.encode_single_token(name) for name in LLAMA3_CHAT_TOKENS}).prompt(DIALOGUE)
    assert fmt.stop_ids == tokenizer.stop_ids == {tokenizer.eos_id, tokenizer.model.encode_single_token("<|eot_id|>")}


def test_the_stop_ids_of_a_template(tmp_path):
    """An instruct model's end of turn may be only in generation_config.json (Gemma's <end_of_turn>), or be the
    tokenizer_config.json's eos_token (Qwen's <|im_end|>)."""
    directory = write_checkpoint(tmp_path / "gemma", "gemma", with_model=True)
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    eos, end_of_turn = tok.token_to_id("<eos>"), tok.token_to_id("<end_of_turn>")
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, end_of_turn]}))
    assert zoo.Chat(zoo.load(directory)).format.stop_ids == {eos, end_of_turn}
    directory = write_checkpoint(tmp_path / "qwen2", "qwen2")
    assert chat_format(load_tokenizer(directory)).stop_ids == {tok.token_to_id("<|im_end|>")}


# ---- zoo.Chat with a template -----------------------------------------------------------------------

def shared(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of a and b."""
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("case", ["qwen2", "mistral", "deepseek_r1"])
def test_cache_reuse_with_a_template(case, tmp_path):
    """Three turns (turn(): each step's logits equal one forward over the dialogue without a cache, the reply
    zoo.chat's). Each turn keeps exactly the longest prefix its ids share with the cached tokens: ChatML's
    every earlier token where the reply re-encodes as generated; Mistral's up to the first user message (the
    system message moved to the last one); DeepSeek R1's up to the <think> the generation prompt opened and
    the history drops. The second reply is made to end at the template's stop token."""
    directory = write_checkpoint(tmp_path / case, case, with_model=True)
    model = zoo.load(directory, dtype=torch.float32)
    chat = zoo.Chat(model, [SYSTEM], max_new_tokens=10)
    stop = next(iter(chat.format.stop_ids))
    assert chat.format.stop_ids == {stop}  # <|im_end|>; </s>
    stats, first_ids, generated = turn(model, chat, "What does the for statement do?")
    assert stats["cached_tokens"] == 0 and len(generated) == 10 and stop not in generated

    after = chat.format.prompt(chat.messages + [{"role": "user", "content": "And the while statement?"}])
    would = zoo.generate(model, [after], max_new_tokens=6, stop_ids=set())[0]
    chosen = next(t for k, t in enumerate(would) if k >= 2 and t not in would[:k])
    with torch.no_grad():
        model.output.weight[stop] = 1.05 * model.output.weight[chosen]
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    for text in ("And the while statement?", "Thanks."):
        before = list(chat.tokens)
        stats, ids, generated = turn(model, chat, text)
        cached = stats["cached_tokens"]
        assert cached == shared(before, ids) and stats["prefill_tokens"] == len(ids) - cached
        reused, dropped = (tok.decode(part, skip_special_tokens=False) for part in (before[:cached], before[cached:]))
        if case == "qwen2":
            assert cached >= len(first_ids)  # the whole first prompt at least
        elif case == "mistral":  # reused up to where the system message was, which moved on to the last user message
            assert reused.endswith("[INST]") and "brief" in dropped.split("[/INST]")[0]
        else:  # the cache holds <think>\n and the reply; the history has the reply after <|Assistant|>
            assert reused.endswith("<|Assistant|>") and dropped.startswith("<think>\n") and "<think>" not in reused
        if text == "And the while statement?":
            assert generated[-1] == stop and len(generated) < 10  # ended by the stop token
    assert ids == transformers_ids(directory, chat.messages[:-1])  # the replies closed as the template closes them


FIRST_VARIANTS = {}  # each registered family's first variant but LLaMA's (the tests above)
for variant, (family, _) in FAMILY_VARIANTS.items():
    if family in FAMILIES:
        FIRST_VARIANTS.setdefault(family, variant)


@pytest.mark.parametrize("variant", list(FIRST_VARIANTS.values()))
def test_every_family_chats_in_its_checkpoint_template(variant, tmp_path):
    """A template is the checkpoint's, whatever its family (OPT's and GPT-NeoX's have no format of zoo's own): two
    turns of Gemma's template, each step's logits those of one uncached forward, the second reusing the first."""
    directory = write_checkpoint(tmp_path / variant, "gemma", with_model=variant)
    model = zoo.load(directory, dtype=torch.float32)
    chat = zoo.Chat(model, max_new_tokens=6)
    turn(model, chat, "Hi")
    before = list(chat.tokens)
    stats, ids, _ = turn(model, chat, "Why?")
    assert stats["cached_tokens"] == shared(before, ids) > 10
    assert ids == transformers_ids(directory, chat.messages[:-1])


# ---- a template's errors ----------------------------------------------------------------------------

BAD = [  # (template, the error's text after "the chat template failed: ")
    ("{% for m in messages %}{{ m.content }}",
     r"not a Jinja template: line 1: Unexpected end of template. Jinja was looking for the following tags: 'endfor' or "
     r"'else'. The innermost block that needs to be closed is 'for'."),
    ("{{ raise_exception('Only user and assistant roles are supported!') }}",
     r"it raised an error: Only user and assistant roles are supported!"),
    ("{{ messages[0].nothing.here }}", r"it raised an error: 'dict object' has no attribute 'nothing'"),
    ("{{ 1 // 0 }}", r"it raised ZeroDivisionError: integer division or modulo by zero"),
    ("{{ ''.__class__.__mro__ }}", r"it reached outside Jinja's sandbox, which refused: access to attribute "
                                   r"'__class__' of 'str' object is unsafe."),
    ("{{ messages.append(messages[0]) }}", r"it reached outside Jinja's sandbox, which refused: access to attribute "
                                           r"'append' of 'list' object is unsafe."),
    ("{% set ns = namespace() %}{% set ns._x = 1 %}", r"it reached outside Jinja's sandbox, which refused: a namespace "
                                                      r"attribute may not start with '_': '_x'"),
    ("{{ cycler.__init__.__globals__ }}", r"it reached outside Jinja's sandbox, which refused: access to attribute "
                                          r"'__init__' of 'type' object is unsafe."),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("template") / "qwen2", "qwen2", with_model=True)


@pytest.mark.parametrize("template, message", BAD)
def test_a_template_that_raises_or_escapes_is_a_clear_error(template, message, model_dir, tmp_path):
    directory = tmp_path / "bad"
    shutil.copytree(model_dir, directory)
    (directory / "chat_template.jinja").write_text(template)
    model = zoo.load(directory)  # a template is not needed to load, nor to generate
    assert zoo.generate(model, [[5, 6]], max_new_tokens=2)
    file = re.escape(str(directory / "chat_template.jinja"))
    with pytest.raises(ValueError, match=rf"^{file}: the chat template failed: {message}$"):
        zoo.chat(model, [{"role": "user", "content": "Hi"}])
    ref = transformers.AutoTokenizer.from_pretrained(directory)
    with pytest.raises(Exception):  # transformers refuses it too
        ref.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True)


def test_gemma_refuses_a_system_message(tmp_path):
    directory = write_checkpoint(tmp_path / "gemma", "gemma", with_model=True)
    model = zoo.load(directory)
    chat = zoo.Chat(model, [SYSTEM])
    with pytest.raises(ValueError, match=r"tokenizer_config.json \(chat_template\): the chat template failed: it "
                                         r"raised an error: System role not supported$"):
        chat.send("Hi")
    assert chat.messages == [SYSTEM] and chat.tokens == []  # nothing changed
    chat.messages[:] = []
    assert chat.send("Hi") == zoo.chat(model, [{"role": "user", "content": "Hi"}])


def test_run_py_chat_with_a_bad_template_is_one_line(model_dir, tmp_path):
    directory = tmp_path / "bad"
    shutil.copytree(model_dir, directory)
    (directory / "chat_template.jinja").write_text("{{ ''.__class__.__mro__ }}")
    status, out, err = run_py("--ckpt", str(directory), "--chat", stdin="Hi\n")
    assert status == 2 and err.count("\n") == 1
    assert err == (f"error: {directory / 'chat_template.jinja'}: the chat template failed: it reached outside Jinja's "
                   f"sandbox, which refused: access to attribute '__class__' of 'str' object is unsafe.\n")
    status, out, err = run_py("--ckpt", str(model_dir), "--chat", "--max-new-tokens", "3", stdin="Hi\n")
    assert status == 0 and out.startswith("> ") and "(+0 cached)" in err


@pytest.mark.parametrize("file, content, message", [
    ("tokenizer_config.json", {"chat_template": 5}, r"tokenizer_config.json \(chat_template\): 5 is not a template "
                                                    r"\(a string, or a list of \{\"name\", \"template\"\} objects\)"),
    ("tokenizer_config.json", {"chat_template": [{"name": "tool_use", "template": "x"}]},
     r"tokenizer_config.json \(chat_template\): a list of templates should hold one named \"default\" \(the one "
     r"used\), found \['tool_use'\]"),
    ("special_tokens_map.json", {"bos_token": ["<s>"]}, r"special_tokens_map.json: bos_token \['<s>'\] is not a token "
                                                        r"\(a string, or an object with its \"content\"\)"),
    ("generation_config.json", {"eos_token_id": "</s>"}, r"generation_config.json: eos_token_id '</s>' is not a token "
                                                         r"id \(an int, or a list of them\)"),
])
def test_a_bad_template_entry_names_the_file(file, content, message, tmp_path):
    directory = write_checkpoint(tmp_path / "bad", "qwen2")
    config = json.loads((directory / "tokenizer_config.json").read_text()) if file == "tokenizer_config.json" else {}
    (directory / file).write_text(json.dumps({**config, **content}))
    with pytest.raises(zoo.CheckpointError, match=message):
        load_tokenizer(directory)


# ---- without a template ----------------------------------------------------------------------------

def test_a_checkpoint_without_a_template_keeps_llama2_format(tiny_dir):
    """Meta's original checkpoints ship none: the bundled tiny model chats in LLaMA 2's format, as before."""
    tokenizer = load_tokenizer(tiny_dir)
    assert tokenizer.chat_template is None
    assert isinstance(chat_format(tokenizer), Llama2Format)
    model = zoo.load(tiny_dir, dtype=torch.float32)
    chat = zoo.Chat(model, max_new_tokens=8)
    assert isinstance(chat.format, Llama2Format)
    chat.send("Hi")
    assert chat.tokens[:len(chat.format.prompt([{"role": "user", "content": "Hi"}]))] == chat.format.prompt(
        [{"role": "user", "content": "Hi"}])
