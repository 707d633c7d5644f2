"""A checkpoint's own Jinja chat template: read beside its tokenizer (read_chat_template, called by
zoo.tokenizer.load_tokenizer) and rendered as transformers' apply_chat_template renders it (TemplateFormat,
one of zoo/chat.py's formats): jinja2's ImmutableSandboxedEnvironment, trim_blocks and lstrip_blocks, loop
controls, `raise_exception`, `strftime_now`, a `tojson` that leaves HTML alone, a `namespace` refusing
names that start with "_", and transformers' {% generation %} tag.
"""
import json
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import jinja2
import jinja2.ext
import jinja2.sandbox

from zoo.checks import CheckpointError, is_int, read_json, read_utf8, shown

NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplate(NamedTuple):
    """A checkpoint's own Jinja chat template. `source`: where it was read (a file, and the key in it);
    `special_tokens`: the named special tokens a template may write ({"bos_token": "<s>", ...}, the
    variables transformers gives it); `stop_ids`: generation_config.json's eos_token_id (an instruct
    model's end of turn, such as Gemma's <end_of_turn>, may be only there)."""
    text: str
    source: str
    special_tokens: dict[str, str]
    stop_ids: frozenset[int]


def read_chat_template(directory: Path) -> ChatTemplate | None:
    """The chat template beside a checkpoint, as transformers reads it: `chat_template.jinja` (transformers 5
    writes it) before tokenizer_config.json's `chat_template` (a string, or a list of {"name", "template"}
    whose "default" one is used); None if neither. The special tokens are tokenizer_config.json's, then
    special_tokens_map.json's for those it lacks (a string, or an object with its "content")."""
    config_file, jinja_file = directory / "tokenizer_config.json", directory / "chat_template.jinja"
    config = read_json(config_file) if config_file.exists() else {}
    if jinja_file.exists():
        text, source = read_utf8(jinja_file), str(jinja_file)
    elif config.get("chat_template") is not None:
        text, source = config["chat_template"], f"{config_file} (chat_template)"
        if isinstance(text, list):
            names = [t.get("name") if isinstance(t, dict) else t for t in text]
            text = next((t.get("template") for t in text if isinstance(t, dict) and t.get("name") == "default"), None)
            if text is None:
                raise CheckpointError(f"{source}: a list of templates should hold one named \"default\" (the one "
                                      f"used), found {shown(names)}")
            source = f"{config_file} (chat_template \"default\")"
        if not isinstance(text, str):
            raise CheckpointError(f"{source}: {shown(text)} is not a template (a string, or a list of "
                                  f"{{\"name\", \"template\"}} objects)")
    else:
        return None
    special = {}
    for path in (config_file, directory / "special_tokens_map.json"):
        named = read_json(path) if path.exists() else {}
        for name in NAMED_SPECIAL_TOKENS:
            token = named[name].get("content") if isinstance(named.get(name), dict) else named.get(name)
            if not (token is None or isinstance(token, str)):
                raise CheckpointError(f"{path}: {name} {shown(named[name])} is not a token (a string, or an object "
                                      f"with its \"content\")")
            if token is not None:
                special.setdefault(name, token)
    generation_file = directory / "generation_config.json"
    eos = read_json(generation_file).get("eos_token_id") if generation_file.exists() else None
    eos = [eos] if is_int(eos) else [] if eos is None else eos
    if not (isinstance(eos, list) and all(map(is_int, eos))):
        raise CheckpointError(f"{generation_file}: eos_token_id {shown(eos)} is not a token id (an int, or a list of "
                              f"them)")
    return ChatTemplate(text, source, special, frozenset(eos))



class TemplateFormat:
    """A checkpoint's own Jinja chat template, rendered as transformers renders it (see the module's docstring)."""

    def __init__(self, tokenizer, template: ChatTemplate):
        self.tokenizer, self.template = tokenizer, template
        self.compiled = self._run(lambda: sandbox().from_string(template.text))
        eos = template.special_tokens.get("eos_token")
        eos_ids = tokenizer.encode_chat(eos) if eos else []
        self.stop_ids = tokenizer.stop_ids | template.stop_ids | (set(eos_ids) if len(eos_ids) == 1 else set())

    def text(self, messages: list[dict]) -> str:
        """The template rendered for a checked dialogue ending with a user message, the assistant's turn opened."""
        variables = {**self.template.special_tokens, "messages": [dict(m) for m in messages], "tools": None,
                     "documents": None, "add_generation_prompt": True}
        return self._run(lambda: self.compiled.render(**variables))

    def prompt(self, messages: list[dict]) -> list[int]:
        """A checked dialogue ending with a user message -> the token ids the reply follows."""
        return self.tokenizer.encode_chat(self.text(messages))

    def _run(self, step):
        """step(), a template's error in it a ValueError naming the template's file (on one line)."""
        try:
            return step()
        except jinja2.TemplateSyntaxError as e:
            problem = f"not a Jinja template: line {e.lineno}: {e.message}"
        except jinja2.sandbox.SecurityError as e:
            problem = f"it reached outside Jinja's sandbox, which refused: {e}"
        except jinja2.TemplateError as e:  # raise_exception's, an undefined value used
            problem = f"it raised an error: {e}"
        except Exception as e:  # the template is the checkpoint's code: what it raises is its error, never zoo's
            problem = f"it raised {type(e).__name__}: {e}"
        raise ValueError(f"{self.template.source}: the chat template failed: {' '.join(problem.split())}") from None


def sandbox() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in: sandboxed, its objects immutable, blocks trimmed,
    with the globals and filters templates on the Hub rely on."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols, GenerationTag])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)  # HTML left alone
    env.globals.update(raise_exception=_raise, strftime_now=lambda format: datetime.now().strftime(format),
                       dict=lambda *args, **kwargs: dict(*args, **kwargs), namespace=Namespace)
    return env


def _raise(message):
    raise jinja2.TemplateError(message)


class Namespace(jinja2.utils.Namespace):
    """Jinja's namespace(), refusing names that start with "_" (a way to internals the sandbox does not watch)."""

    def __init__(*args, **kwargs):  # Jinja's signature, so that namespace(self=...) works
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.sandbox.SecurityError(f"a namespace attribute may not start with '_': {name!r}")


class GenerationTag(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}: transformers marks the assistant's tokens with it; here it renders
    its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()
