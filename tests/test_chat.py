"""zoo.chat and zoo.Chat: the formats' token ids against the published formats, a session's cache reuse
against the dialogue re-run from scratch, run.py --chat in one process, in a subprocess and under torchrun.

Expected ids are written from the formats as published (Meta's llama/generation.py chat_completion
and llama3's ChatFormat): the literal strings encoded by the raw SentencePiece / tiktoken /
`tokenizers` encoders, and LLaMA 3's documented special-token ids (128000 <|begin_of_text|>, 128006
<|start_header_id|>, 128007 <|end_header_id|>, 128009 <|eot_id|>), not from zoo's code.
"""
import base64
import json
import os
import subprocess
import sys

import pytest
import tiktoken
import torch
from conftest import ROOT
from helpers import hf_family, hf_llama, run_py, run_py_module, save_hf, torchrun
from sentencepiece import SentencePieceProcessor

import zoo
from zoo.chat import chat_format
from zoo.tokenizer import LLAMA3_PATTERN, load_tokenizer

SYSTEM = {"role": "system", "content": "Be brief."}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ---- the formats' token ids ------------------------------------------------------------------------

def test_llama2_format_ids_are_meta_chat_completion(tiny_dir):
    sp = SentencePieceProcessor(model_file=str(tiny_dir / "tokenizer.model"))
    bos, eos = 1, 2  # the tiny tokenizer's, as LLaMA 2's
    assert (sp.bos_id(), sp.eos_id()) == (bos, eos)
    fmt = chat_format(load_tokenizer(tiny_dir))
    dialogue = [{"role": "system", "content": "Be brief."}, user("  Hi there \n"), assistant(" Hello!  "),
                user("Why?"), assistant("Because.\n"), user(" And then? ")]
    # the system message opens the first user message; that merged content is stripped as a whole
    want = ([bos] + sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n  Hi there [/INST] Hello! ") + [eos]
            + [bos] + sp.encode("[INST] Why? [/INST] Because. ") + [eos]
            + [bos] + sp.encode("[INST] And then? [/INST]"))
    assert fmt.prompt(dialogue) == want
    assert fmt.prompt([user("Hi")]) == [bos] + sp.encode("[INST] Hi [/INST]")
    assert fmt.stop_ids == {eos}


def llama3_ranks(filler_to: int = 0) -> dict[bytes, int]:
    """A byte-level tiktoken vocabulary with a few merges; unused filler tokens up to `filler_to` ranks."""
    ranks = {bytes([b]): b for b in range(256)}
    for merge in (b"\n\n", b"us", b"er", b"user", b"as", b"si", b"st", b"ant", b"Hi", b" t", b"th", b"the"):
        ranks[merge] = len(ranks)
    filler = 0
    while len(ranks) < filler_to:  # bytes no text here contains: never produced by encoding
        ranks[b"\xff\xfe" + filler.to_bytes(3, "big")] = len(ranks)
        filler += 1
    return ranks


def write_tiktoken(ranks: dict[bytes, int], directory):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return directory


def test_llama3_format_ids_are_meta_chat_format(tmp_path):
    """LLaMA 3's tokenizer.model: 128000 ranks, so the special tokens take their published ids."""
    ranks = llama3_ranks(filler_to=128000)
    raw = tiktoken.Encoding("raw", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})
    begin, start, end, eot, end_of_text = 128000, 128006, 128007, 128009, 128001
    fmt = chat_format(load_tokenizer(write_tiktoken(ranks, tmp_path)))

    def message(role, content):  # content already stripped, as the format strips it
        return [start, *raw.encode(role), end, *raw.encode("\n\n"), *raw.encode(content), eot]

    dialogue = [SYSTEM, user(" Hi there\n"), assistant("Hello!  "), user("the user <|eot_id|>")]
    want = ([begin] + message("system", "Be brief.") + message("user", "Hi there") + message("assistant", "Hello!")
            + message("user", "the user <|eot_id|>")  # special tokens in the text are text, as in Meta's tokenizer
            + [start, *raw.encode("assistant"), end, *raw.encode("\n\n")])
    assert fmt.prompt(dialogue) == want
    assert raw.encode("user") == [ranks[b"user"]] and len(raw.encode("the user <|eot_id|>")) < 19  # merges did apply
    assert fmt.stop_ids == {end_of_text, eot}


def hf_tokenizer_json(directory, specials: list[str]):
    """A byte-level BPE tokenizer.json (Hugging Face `tokenizers`) adding `specials`; returns the reference."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": specials[0], "eos_token": specials[1]}))
    return tok


def test_llama3_format_from_a_hf_tokenizer_json(tmp_path):
    """LLaMA 3 as the Hub ships it: a tokenizer.json whose added tokens include the header tokens."""
    ref = hf_tokenizer_json(tmp_path, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                       "<|end_header_id|>", "<|eot_id|>"])
    fmt = chat_format(load_tokenizer(tmp_path))
    special = ref.token_to_id
    want = [special("<|begin_of_text|>")]
    for role, content in (("system", "Be brief."), ("user", "Hi"), ("assistant", "")):
        want += [special("<|start_header_id|>"), *ref.encode(role).ids, special("<|end_header_id|>"),
                 *ref.encode("\n\n").ids]
        want += [*ref.encode(content).ids, special("<|eot_id|>")] if content else []
    assert fmt.prompt([SYSTEM, user(" Hi ")]) == want
    assert fmt.stop_ids == {special("<|end_of_text|>"), special("<|eot_id|>")}


def test_tokenizers_without_a_chat_format_are_refused(tmp_path):
    hf_tokenizer_json(tmp_path / "neox", ["<|endoftext|>", "<|padding|>"])  # GPT-NeoX / OPT style: no chat tokens
    with pytest.raises(ValueError, match=r"tokenizer \(HFTokenizer\) has no chat format: .* this one lacks "
                                         r"<\|begin_of_text\|>, <\|start_header_id\|>, <\|end_header_id\|>, <\|eot_id\|>"):
        chat_format(load_tokenizer(tmp_path / "neox"))
    hf_tokenizer_json(tmp_path / "half", ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    with pytest.raises(ValueError, match=r"this one lacks <\|start_header_id\|>, <\|end_header_id\|>\)"):
        chat_format(load_tokenizer(tmp_path / "half"))
    with pytest.raises(ValueError, match="this model has no tokenizer"):
        chat_format(None)


# ---- a session's cache reuse equals the dialogue re-run from scratch -----------------------------------

@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    """A random LLaMA with a LLaMA 3 tiktoken tokenizer.model (specials after 268 ranks; vocabulary 524)."""
    directory = write_tiktoken(llama3_ranks(), tmp_path_factory.mktemp("llama3"))
    return save_hf(hf_llama("gqa", vocab_size=len(llama3_ranks()) + 256, max_position_embeddings=1024), directory)


def turn(model, chat, text: str) -> tuple[dict, list[int], list[int]]:
    """One greedy turn of `chat`, checked against the dialogue re-run from scratch: one forward over its tokens
    without a cache gives the logits of every step (fp32, 2e-6 of their scale), and zoo.chat on the same messages, the reply.
    Returns the turn's stats, its prompt's ids and the tokens generated (the stop token included)."""
    steps = []  # the logits each token was chosen from: (vocab,) per step, the prefill's last position first
    handle = model.register_forward_hook(lambda module, args, out: steps.append(out[0, -1]))
    try:
        stats = {}
        reply = "".join(chat.stream(text, stats=stats))
    finally:
        handle.remove()
    ids = chat.format.prompt(chat.messages[:-1])
    generated = [int(s.argmax()) for s in steps]
    with torch.no_grad():
        again = model(torch.tensor([ids + generated[:-1]]))[0, len(ids) - 1:]
    # fp32 rounding of the cached steps against one forward, relative to the logits' scale: measured 1.2e-6 of
    # it at most (1.7e-5 on logits up to 14.5, transformers 5.24's random init)
    torch.testing.assert_close(torch.stack(steps), again, atol=2e-6 * again.abs().max().item(), rtol=0)
    assert chat.tokens == (ids + generated)[:-1]  # what the cache holds: all but the last token generated
    assert stats["prefill_tokens"] == len(ids) - stats["cached_tokens"]  # only what the cache lacked was prefilled
    assert reply == zoo.chat(model, chat.messages[:-1], max_new_tokens=chat.max_new_tokens)
    return stats, ids, generated


@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_cache_reuse_equals_the_dialogue_re_run(family, tiny_dir, llama3_dir):
    """Three turns: one cut at max_new_tokens, one ended by the format's stop token, one after an earlier reply
    was edited (the cache is rewound to where the dialogue changed); the cache grows on the way."""
    model = zoo.load(tiny_dir if family == "llama2" else llama3_dir, dtype=torch.float32)
    chat = zoo.Chat(model, [SYSTEM], max_new_tokens=12)
    stop = model.tokenizer.eos_id if family == "llama2" else chat.format.special["<|eot_id|>"]

    stats, first_ids, generated = turn(model, chat, "What does the for statement do?")
    assert stats["cached_tokens"] == 0 and len(generated) == 12 and stop not in generated  # cut at max_new_tokens
    sizes = [chat.cache.max_len]

    # make the next reply end at the stop token: it takes the place of a token the model would choose
    after = chat.format.prompt(chat.messages + [user("And the while statement?")])
    would = zoo.generate(model, [after], max_new_tokens=6, stop_ids=set())[0]
    chosen = next(t for k, t in enumerate(would) if k >= 2 and t not in would[:k])
    with torch.no_grad():
        model.output.weight[stop] = 1.05 * model.output.weight[chosen]
    before = list(chat.tokens)
    stats, ids, generated = turn(model, chat, "And the while statement?")
    assert generated[-1] == stop and len(generated) < 12  # ended by the stop token
    # every earlier token is reused where the reply's text encodes to the tokens the model chose: so for the
    # trained tiny model; the random model's bytes (partial characters, special tokens as text) need not
    shared = next(k for k in range(len(before) + 1) if k == len(before) or ids[k] != before[k])
    assert stats["cached_tokens"] == shared and shared >= len(first_ids)
    if family == "llama2":
        assert shared == len(before)
    sizes.append(chat.cache.max_len)

    chat.messages[2]["content"] = "A loop over the items of a sequence."  # the first reply, edited
    before = list(chat.tokens)
    stats, ids, generated = turn(model, chat, "Thanks.")
    first_reply = len(chat.format.prompt(chat.messages[:2]))  # the tokens before the first reply
    assert first_reply - 2 <= stats["cached_tokens"] < len(before)  # rewound to about where the dialogue changed
    assert ids[stats["cached_tokens"]] != before[stats["cached_tokens"]]
    # both replies closed by the stop token, whether cut at max_new_tokens or not (LLaMA 3: every message)
    assert ids.count(stop) == (2 if family == "llama2" else 6)
    sizes.append(chat.cache.max_len)
    assert sizes[0] < sizes[1] <= sizes[2] <= model.config.max_seq_len  # the cache grew with the dialogue


def test_dialogue_longer_than_the_context(tiny_dir):
    """A reply is cut where the context ends; a turn that leaves no room is an error that changes nothing."""
    model = zoo.load(tiny_dir, dtype=torch.float32, max_seq_len=64)
    chat = zoo.Chat(model, max_new_tokens=500)
    chat.send("What does the for statement do?")
    assert len(chat.tokens) == 63 and chat.cache.max_len == 64  # the reply filled the context
    messages = [dict(m) for m in chat.messages]
    with pytest.raises(ValueError, match=r"the dialogue's \d+ tokens do not fit the model's context of 64 .*start a new "
                                         r"Chat, or drop early turns from chat.messages"):
        chat.send("And the while statement?")
    assert chat.messages == messages and len(chat.tokens) == 63
    chat.messages[:] = []  # dropping the turns makes room again
    assert chat.send("Hi") == zoo.chat(model, [user("Hi")], max_new_tokens=500)


def test_a_reply_read_in_part_stays_in_part(tiny_dir):
    model = zoo.load(tiny_dir, dtype=torch.float32)
    chat = zoo.Chat(model, max_new_tokens=16)
    pieces = chat.stream("What does the for statement do?")
    first = next(pieces) + next(pieces)
    pieces.close()
    assert chat.messages[-1] == assistant(first)
    pieces = chat.stream("And the while statement?")
    next(pieces)
    reply = chat.send("Thanks.")  # the next turn closes the open reply first
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 3
    assert reply == zoo.chat(model, chat.messages[:-1], max_new_tokens=16)


def test_a_compiled_model_chats_as_the_eager_one(tiny_dir):
    """zoo.compile: the session decodes into a static cache (rewound and grown as the eager one is)."""
    eager, compiled = (zoo.load(tiny_dir, dtype=torch.float32) for _ in range(2))
    zoo.compile(compiled)
    sessions = [zoo.Chat(model, [SYSTEM], max_new_tokens=12) for model in (eager, compiled)]
    for text in ("What does the for statement do?", "And the while statement?", "Thanks."):
        replies = [chat.send(text) for chat in sessions]
        assert replies[0] == replies[1] and len(replies[0]) > 10
        for chat in sessions:
            chat.messages[2]["content"] = "A loop over the items of a sequence."  # the next turn rewinds the cache
    assert sessions[1].cache.static and not sessions[0].cache.static
    assert sessions[0].tokens == sessions[1].tokens


def test_bad_messages_are_clear_errors(tiny_dir):
    model = zoo.load(tiny_dir, dtype=torch.float32)
    cases = [
        ([user("a"), user("b")], ValueError, r'messages\[1\]\["role"\]=\'user\' is not accepted: \'assistant\' here'),
        ([user("a"), SYSTEM, user("b")], ValueError, r'messages\[1\]\["role"\]=\'system\' .* \'assistant\' here'),
        ([assistant("a"), user("b")], ValueError, r'messages\[0\]\["role"\]=\'assistant\' .* \'user\' here'),
        ([{"role": "bot", "content": "a"}], ValueError, r'messages\[0\]\["role"\]=\'bot\' .* \'user\' here: a list of '
                                                        r'messages \{"role": "system" \| "user" \| "assistant"'),
        ([user("a"), assistant("b")], ValueError, r"is not accepted: .* ending with a user message"),
        ([SYSTEM], ValueError, r"ending with a user message"),
        ([], ValueError, r"messages=\[\] is not accepted: .* ending with a user message"),
        ([user(3)], TypeError, r'messages\[0\]\["content"\]=3 is not accepted: a str'),
        ([{"content": "a"}], TypeError, r'messages\[0\]=\{\'content\': \'a\'\} is not accepted: a dict \{"role"'),
        ("hello", TypeError, r"messages='hello' is not accepted: a list of messages"),
    ]
    for messages, error, message in cases:
        with pytest.raises(error, match=message):
            zoo.chat(model, messages)
    with pytest.raises(ValueError, match="each user message answered"):
        zoo.Chat(model, [SYSTEM, user("a")])
    with pytest.raises(ValueError, match="temperature=-1 is not accepted"):
        zoo.Chat(model, temperature=-1)
    chat = zoo.Chat(model)
    with pytest.raises(TypeError, match="text=None is not accepted: a str"):
        chat.send(None)
    chat.messages.append(user("edited in"))
    with pytest.raises(ValueError, match=r"chat.messages=\[\{'role': 'user', 'content': 'edited in'\}\] is not "
                                         r"accepted: .* each user message answered"):
        chat.send("b")
    chat.messages[0]["role"] = "assistant"
    with pytest.raises(ValueError, match=r"chat.messages\[0\]\[\"role\"\]='assistant' is not accepted: 'user' here"):
        chat.send("b")


# ---- run.py --chat ---------------------------------------------------------------------------------

CHAT_ARGS = ("--chat", "--system", "Be brief.", "--max-new-tokens", "10", "--temperature", "0", "--dtype", "float32")
CHAT_INPUT = "What does the for statement do?\n\nAnd the while statement?\n"  # an empty line is no message


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return zoo.load(tiny_dir, dtype=torch.float32)


def replies(model, **sampling) -> tuple[str, str]:
    """The two replies run.py --chat should print for CHAT_INPUT, each from the whole dialogue, no session."""
    first = zoo.chat(model, [SYSTEM, user("What does the for statement do?")], **sampling)
    second = zoo.chat(model, [SYSTEM, user("What does the for statement do?"), assistant(first),
                              user("And the while statement?")], **sampling)
    return first, second


def test_run_py_chat_as_a_user_runs_it(tiny):
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), *CHAT_ARGS], input=CHAT_INPUT, capture_output=True,
                       text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr
    first, second = replies(tiny, max_new_tokens=10)
    assert len(first) > 10 and len(second) > 10
    assert r.stdout == f"> {first}\n> > {second}\n> "  # a reply per message; the empty line asked again
    reports = [line for line in r.stderr.splitlines() if line.startswith("[prefill")]
    assert len(reports) == 2 and "(+0 cached)" in reports[0]
    assert "(+0 cached)" not in reports[1] and " cached): " in reports[1] and "Traceback" not in r.stderr


def test_run_py_chat_samples_with_the_flags(tiny):
    flags = ("--chat", "--max-new-tokens", "10", "--temperature", "0.9", "--top-p", "0.95", "--dtype", "float32")
    status, out, err = run_py(*flags, "--seed", "5", stdin="What does the for statement do?\n")
    assert status == 0, err
    reply = zoo.chat(tiny, [user("What does the for statement do?")], max_new_tokens=10, temperature=0.9, top_p=0.95,
                     seed=5)
    assert out == f"> {reply}\n> "
    assert reply != zoo.chat(tiny, [user("What does the for statement do?")], max_new_tokens=10)  # it did sample


def test_run_py_chat_under_torchrun_equals_one_process():
    status, out, err = run_py(*CHAT_ARGS, stdin=CHAT_INPUT)
    two = torchrun(*CHAT_ARGS, stdin=CHAT_INPUT)
    assert status == 0 and two.returncode == 0, two.stderr
    assert out.count("\n") == 2 and len(out) > 40
    assert two.stdout == out  # the same replies, printed by rank 0 only
    assert two.stderr.count("[prefill") == 2


def test_run_py_chat_bad_use_is_one_line(tmp_path, capsys):
    for argv, message in ((("--chat", "--prompt", "Hi"), "error: --prompt is not accepted with --chat"),
                          (("--system", "Be brief."), "error: --system is a chat's system message: it needs --chat")):
        with pytest.raises(SystemExit) as exit:  # refused as the arguments are parsed, before anything loads
            run_py_module().main(list(argv))
        out, err = capsys.readouterr()
        assert exit.value.code == 2 and out == "" and err.startswith(message) and err.count("\n") == 1, err
    directory = save_hf(hf_family("opt-pre-ln"), tmp_path / "opt")
    hf_tokenizer_json(directory, ["</s>", "<pad>"])
    status, out, err = run_py("--ckpt", str(directory), "--chat", stdin="Hi\n")
    assert status == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: this model's tokenizer (HFTokenizer) has no chat format")
    status, out, err = run_py("--ckpt", str(directory), "--max-new-tokens", "2", stdin="Hi")  # it still completes
    assert status == 0, err
