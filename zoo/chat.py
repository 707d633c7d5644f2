"""Chat: a dialogue in the format the model was tuned on (its checkpoint's own chat template, else the
LLaMA 2 chat and LLaMA 3 instruct formats), and a session that keeps the KV cache of the turns so far.

    reply = zoo.chat(model, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    chat = zoo.Chat(model, [{"role": "system", "content": "Be brief."}])
    chat.send("Hi")                                   # the reply's text; chat.messages now holds both
    for piece in chat.stream("And then?"):            # only the new turn's tokens are prefilled
        print(piece, end="")

The format is the checkpoint's own chat template where it ships one (tokenizer.chat_template:
`chat_template.jinja`, or tokenizer_config.json's `chat_template`), rendered as transformers'
apply_chat_template renders it: jinja2's ImmutableSandboxedEnvironment (trim_blocks, lstrip_blocks,
loop controls; `raise_exception`, `strftime_now`, a `tojson` that leaves HTML alone), given `messages`,
`add_generation_prompt` (true), `tools` and `documents` (none) and the named special tokens
(`bos_token`, `eos_token`, ...); the text is then encoded with its special tokens as those tokens and
none added (transformers' add_special_tokens=False). A template that does not compile, raises
(raise_exception, an undefined value used) or reaches outside the sandbox (`''.__class__`, a list's
`append`) is a ValueError naming its file. Its reply ends at the tokenizer's stop ids, the eos_token,
or generation_config.json's eos_token_id. Else (Meta's original checkpoints ship no template) it is
the first of the model's family's formats (its Family's `chat`: LLaMA's, LLaMA 3's then LLaMA 2's)
that its tokenizer can write:
- LLaMA 2 chat (a SentencePiece tokenizer.model: LLaMA 1 and 2, the bundled tiny model), as Meta's
  chat_completion (llama/generation.py) builds it. A system message opens the first user message as
  "<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}"; each (user, answer) pair is the one string
  "[INST] {user.strip()} [/INST] {answer.strip()} " between bos and eos; the last user message is
  "[INST] {user.strip()} [/INST]" after bos, with no eos:
      bos [INST] u1 [/INST] a1 eos bos [INST] u2 [/INST]
- LLaMA 3 instruct (a tokenizer with <|start_header_id|>, <|end_header_id|> and <|eot_id|>: LLaMA
  3's tokenizer.model, or a tokenizer.json that adds them), as Meta's ChatFormat (llama3's
  tokenizer.py): <|begin_of_text|>, then per message <|start_header_id|>{role}<|end_header_id|>,
  "\\n\\n", {content.strip()}, <|eot_id|>, then the assistant's header and "\\n\\n" for the reply; the
  special tokens by id, each text on its own.
- OPT and GPT-NeoX tokenizers have neither: an error.

Messages are {"role": "system" | "user" | "assistant", "content": str}: an optional system message,
then user and assistant in turn. A reply ends at the format's stop token (eos; <|eot_id|> or
<|end_of_text|>) or after max_new_tokens; either way the next turn closes it as the format does.

The cache of a session: the tokens of a turn are always the format of the whole dialogue so far, its
replies as text (so a session's reply is zoo.chat's on the same messages). A new turn keeps the
cached positions of the longest prefix those tokens share with the ones already in the cache (every
earlier turn, unless a reply's text encodes to other tokens than the model produced, or
chat.messages was edited) and prefills only the rest. The cache grows (doubling, up to the model's
context) as the dialogue does; a dialogue that leaves no room for a reply is an error.
"""
from typing import Iterator

import torch

from zoo.checks import require
from zoo.compile import compiled_for
from zoo.generate import _pieces, _steps, check_sampling
from zoo.models import FAMILIES, family_of
from zoo.chat_template import TemplateFormat
from zoo.tokenizer import SentencePieceTokenizer, TiktokenTokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
LLAMA3_CHAT_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


class Llama2Format:
    """LLaMA 2 chat: [INST] turns, each (user, answer) pair between bos and eos."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stop_ids = {tokenizer.eos_id}

    def prompt(self, messages: list[dict]) -> list[int]:
        """A checked dialogue ending with a user message -> the token ids the reply follows."""
        encode = self.tokenizer.encode
        if messages[0]["role"] == "system":  # the system message opens the first user message
            first = B_SYS + messages[0]["content"] + E_SYS + messages[1]["content"]
            messages = [{"role": "user", "content": first}, *messages[2:]]
        ids = []
        for user, answer in zip(messages[0::2], messages[1::2]):
            ids += encode(f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} ", bos=True,
                          eos=True)
        return ids + encode(f"{B_INST} {messages[-1]['content'].strip()} {E_INST}", bos=True)


class Llama3Format:
    """LLaMA 3 instruct: a header per message, each message ended by <|eot_id|>."""

    def __init__(self, tokenizer, special: dict[str, int]):
        self.tokenizer, self.special = tokenizer, special
        self.stop_ids = tokenizer.stop_ids | {special["<|eot_id|>"]}

    def header(self, role: str) -> list[int]:
        encode, special = self.tokenizer.encode, self.special
        return [special["<|start_header_id|>"], *encode(role), special["<|end_header_id|>"], *encode("\n\n")]

    def prompt(self, messages: list[dict]) -> list[int]:
        """A checked dialogue ending with a user message -> the token ids the reply follows."""
        ids = [self.special["<|begin_of_text|>"]]
        for m in messages:
            ids += self.header(m["role"]) + self.tokenizer.encode(m["content"].strip()) + [self.special["<|eot_id|>"]]
        return ids + self.header("assistant")


ChatFormat = TemplateFormat | Llama2Format | Llama3Format


def chat_format(tokenizer, formats: tuple[str, ...] = ("llama2", "llama3")) -> ChatFormat:
    """The checkpoint's chat template, else the first of `formats` (a family's `chat`: zoo/models/__init__.py)
    that the tokenizer can write (see the module's docstring), or a ValueError saying why there is none."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so no chat format: load it from a checkpoint with one")
    if tokenizer.chat_template is not None:
        return TemplateFormat(tokenizer, tokenizer.chat_template)
    special = {name: _special_id(tokenizer, name) for name in LLAMA3_CHAT_TOKENS}
    for name in formats:
        if name == "llama2" and isinstance(tokenizer, SentencePieceTokenizer) and None not in (tokenizer.bos_id,
                                                                                               tokenizer.eos_id):
            return Llama2Format(tokenizer)
        if name == "llama3" and None not in special.values():
            return Llama3Format(tokenizer, special)
    missing = ", ".join(name for name, i in special.items() if i is None)
    raise ValueError(f"this model's tokenizer ({type(tokenizer).__name__}) has no chat format: its checkpoint has no "
                     f"chat template (chat_template.jinja, or tokenizer_config.json's chat_template), and zoo's own "
                     f"formats are LLaMA 2's (a SentencePiece tokenizer.model with bos and eos) and LLaMA 3's (a "
                     f"tokenizer with {', '.join(LLAMA3_CHAT_TOKENS)}; this one lacks {missing}); OPT and GPT-NeoX "
                     f"have none")


def _special_id(tokenizer, name: str) -> int | None:
    """The id of special token `name`, or None where the tokenizer has no such token."""
    if isinstance(tokenizer, TiktokenTokenizer):
        return tokenizer.model.encode_single_token(name) if name in tokenizer.model.special_tokens_set else None
    return getattr(tokenizer, "added", {}).get(name)  # BPETokenizer: the tokenizer.json's added tokens


def checked_messages(messages, name: str, ends_with_user: bool) -> list[dict]:
    """A dialogue: a list of {"role", "content"} dicts, an optional system message, then user and assistant in
    turn, ending with a user message (ends_with_user) or with each user message answered."""
    accepted = ('a list of messages {"role": "system" | "user" | "assistant", "content": str}: an optional system '
                'message, then user and assistant in turn, ' +
                ("ending with a user message" if ends_with_user else "each user message answered"))
    require(isinstance(messages, (list, tuple)), name, messages, accepted, TypeError)
    first = 1 if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    out = []
    for i, m in enumerate(messages):
        require(isinstance(m, dict) and "role" in m and "content" in m, f"{name}[{i}]", m,
                'a dict {"role": ..., "content": str}', TypeError)
        require(isinstance(m["content"], str), f'{name}[{i}]["content"]', m["content"], "a str", TypeError)
        expected = "system" if i < first else ("user" if (i - first) % 2 == 0 else "assistant")
        require(m["role"] == expected, f'{name}[{i}]["role"]', m["role"], f"{expected!r} here: {accepted}")
        out.append({"role": m["role"], "content": m["content"]})
    last = out[-1]["role"] if len(out) > first else None
    require((last == "user") == ends_with_user, name, messages, accepted)
    return out


class Chat:
    """A dialogue with a model, keeping the KV cache of its tokens from turn to turn.

    `messages`: the dialogue so far (an optional system message, then user and assistant in turn,
    each user message answered). chat.messages may be edited between turns (an exchange dropped, a
    reply changed): the next turn reuses the cache for the part left as it was. The sampling options
    are zoo.generate's; each reply is sampled from `seed` afresh, so it depends only on the dialogue.
    `tokens`: the tokens whose keys and values the cache holds, in order.
    """

    def __init__(self, model, messages: list[dict] | None = None, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None):
        self.model = model
        self.format = chat_format(model.tokenizer, FAMILIES[family_of(model)].chat)
        check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
        self.max_new_tokens = max_new_tokens
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        self.messages = checked_messages([] if messages is None else messages, "messages", ends_with_user=False)
        self.tokens: list[int] = []
        self.cache = None  # made by the first turn, grown as the dialogue grows
        self._open = None  # the stream of a reply still being read

    def send(self, text: str) -> str:
        """The reply to the user's message `text` (leading whitespace dropped); both join chat.messages."""
        return "".join(self.stream(text))

    def stream(self, text: str, stats: dict | None = None) -> Iterator[str]:
        """The reply to the user's message `text`, piece by piece as zoo.stream yields it (leading whitespace
        dropped). When the stream ends (or is closed, or the next turn begins), chat.messages holds the
        user's message and the reply as far as it was read. `stats`, if a dict, receives zoo.stream's
        counts (prefill_tokens: the tokens prefilled, the cached ones left out) and `cached_tokens`."""
        require(isinstance(text, str), "text", text, "a str: the user's message", TypeError)
        if self._open is not None:  # a reply not read to the end: what was read of it stays
            self._open.close()
        history = checked_messages(self.messages, "chat.messages", ends_with_user=False)  # it may have been edited
        messages = history + [{"role": "user", "content": text}]
        ids = self.format.prompt(messages)
        context = self.model.config.max_seq_len
        if len(ids) >= context:
            raise ValueError(f"the dialogue's {len(ids)} tokens do not fit the model's context of {context} (a position "
                             f"must be left for the reply): start a new Chat, or drop early turns from chat.messages")
        new = min(self.max_new_tokens, context - len(ids))
        cached = self._reuse(ids, len(ids) + new)
        if stats is not None:
            stats.update(prefill_tokens=0, prefill_s=0.0, decode_tokens=0, decode_s=0.0, cached_tokens=cached)
        chain = _steps(self.model, [ids[cached:]], len(ids) - cached + new, stop_ids=self.format.stop_ids, hooks=None,
                       cache=self.cache, **self.sampling)
        self._open = self._reply(messages, ids, cached, chain, stats)
        return self._open

    def _reply(self, messages: list[dict], ids: list[int], cached: int, chain, stats) -> Iterator[str]:
        """stream() after its checks: the pieces of the reply, then the dialogue and tokens brought up to date."""
        generated, text = [], ""
        try:
            for piece in _pieces(self.model.tokenizer, ids[cached:], _recorded(chain, generated), self.format.stop_ids,
                                 stats):
                piece = piece if text else piece.lstrip()
                text += piece
                if piece:
                    yield piece
        finally:
            self.tokens = (ids + generated)[:self.cache.pos]  # the last token generated is not in the cache
            self.messages = messages + [{"role": "assistant", "content": text}]
            self._open = None

    @torch.inference_mode()
    def _reuse(self, ids: list[int], needed: int) -> int:
        """Keep the cached positions of the longest prefix of `ids` already in the cache (leaving at least one
        token to prefill), in a cache of at least `needed` positions; returns how many are kept."""
        limit = min(len(self.tokens), len(ids) - 1)
        kept = next((i for i in range(limit) if self.tokens[i] != ids[i]), limit)
        compiled = compiled_for(self.model, None)  # a compiled model decodes into a static cache
        if self.cache is None or self.cache.max_len < needed or self.cache.static != (compiled is not None):
            size = max(needed, 2 * self.cache.max_len if self.cache else 0)
            context = self.model.config.max_seq_len
            size = compiled.cache_len(size, context) if compiled else min(size, context)
            cache = self.model.new_cache(1, size, static=compiled is not None)
            if self.cache is not None:
                for old, new in zip(self.cache.keys + self.cache.values, cache.keys + cache.values):
                    new[:, :, :kept] = old[:, :, :kept]  # (1, n_kv_heads, positions, head_dim)
            self.cache = cache
        self.cache.seek(kept)  # the model writes the next tokens from here
        self.tokens = self.tokens[:kept]
        return kept


def _recorded(chain, generated: list[int]):
    """The (tokens, done) steps of one row, each token also appended to `generated`."""
    for tokens, done in chain:
        generated.append(tokens.item())
        yield tokens, done


def chat(model, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
         top_p: float | None = None, seed: int | None = None) -> str:
    """The assistant's reply (its text) to a dialogue ending with a user message; see Chat for a session."""
    messages = checked_messages(messages, "messages", ends_with_user=True)
    return Chat(model, messages[:-1], max_new_tokens, temperature, top_k, top_p, seed).send(messages[-1]["content"])
