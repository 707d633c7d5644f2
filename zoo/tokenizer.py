"""Tokenizers behind one small interface: encode(text, bos, eos), decode(ids), bos_id, eos_id.

- SentencePiece `tokenizer.model` (LLaMA 1 and 2, and the tiny bundled model).
- LLaMA 3's `tokenizer.model`: a tiktoken ranks file (base64 token, rank per line) plus 256
  special tokens numbered after the ranks.
- A Hugging Face `tokenizer.json` of any kind (LLaMA 2 and 3 on the Hub, GPT-NeoX/Pythia), run by the
  `tokenizers` library exactly as transformers runs it (normalizers, added tokens and all).
- A byte-level BPE from GPT-2's `vocab.json` + `merges.txt` (OPT; metaseq's with fairseq's
  `dict.txt`), run on tiktoken: its mergeable ranks are built from the merges.

Each tokenizer knows the files it was made from (`files`: name -> path), so that a checkpoint
written from a model (zoo.quant.save) can take them along, and the checkpoint's own chat template
(`chat_template`: a zoo.chat_template.ChatTemplate, or None; zoo/chat.py renders it).
"""
import base64
import json
import re
from pathlib import Path

from zoo import bpe
from zoo.chat_template import read_chat_template
from zoo.checks import CheckpointError, is_int, read_json, read_utf8, shown

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)]
                   + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
                   + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)])


class Tokenizer:
    """What every tokenizer offers. `stop_ids` are the ids that end generation; `files` the files it came from."""
    files: dict[str, Path] = {}
    bos_id: int | None
    eos_id: int | None
    stop_ids: set[int]
    n_words: int
    add_bos = True  # False: encode(bos=True) adds no bos (a tokenizer_config.json's add_bos_token: false)
    chat_template = None  # a zoo.chat_template.ChatTemplate, where the checkpoint ships one

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._encode(text)
        return ([self.bos_id] if bos and self.add_bos and self.bos_id is not None else []) + ids + \
               ([self.eos_id] if eos and self.eos_id is not None else [])

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_chat(self, text: str) -> list[int]:
        """A rendered chat template: the special and added tokens in `text` are those tokens, the rest is text
        (transformers' encode(add_special_tokens=False)); no bos or eos is added."""
        return self._encode(text)  # HFTokenizer and BPETokenizer recognise added tokens in the text

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: Path, files: dict[str, Path] | None = None):
        from sentencepiece import SentencePieceProcessor
        self.files = files or {path.name: path}
        try:
            self.sp = SentencePieceProcessor(model_file=str(path))
        except RuntimeError as e:  # sentencepiece's own ("INTERNAL: could not parse ModelProto") may name no file
            raise CheckpointError(f"{path}: not a SentencePiece model, corrupt or truncated? ({e})") from None
        except UnicodeDecodeError:  # its error message quoted a piece that is not UTF-8
            raise CheckpointError(f"{path}: not a SentencePiece model, corrupt or truncated? (a piece that is not "
                                  f"UTF-8)") from None
        self.n_words = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.stop_ids = {self.eos_id} - {None}

    def _encode(self, text):
        return self.sp.encode(text)

    def encode_chat(self, text):
        # sentencepiece encodes "<s>" as text: the control and unknown pieces are cut out and given their ids,
        # each piece of text between them encoded on its own (as transformers' added tokens split the text)
        if not hasattr(self, "_specials"):
            self._specials = {self.sp.id_to_piece(i): i for i in range(self.n_words)
                              if self.sp.is_control(i) or self.sp.is_unknown(i)}
            self._split = re.compile(f"({'|'.join(map(re.escape, sorted(self._specials, key=len, reverse=True)))})")
        ids = []
        for k, part in enumerate(self._split.split(text)):
            ids += [self._specials[part]] if k % 2 else self.sp.encode(part) if part else []
        return ids

    def decode(self, ids):
        return self.sp.decode(list(ids))


class TiktokenTokenizer(Tokenizer):
    """LLaMA 3's tokenizer.model. Special tokens in the text are encoded as plain text, as Meta does."""

    def __init__(self, path: Path, files: dict[str, Path] | None = None):
        import tiktoken
        self.files = files or {path.name: path}
        ranks = {}
        for number, line in enumerate(path.read_bytes().splitlines(), start=1):
            if line:
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError:  # binascii.Error is one
                    raise CheckpointError(f"{path} line {number}: expected a base64 token and its rank, found "
                                          f"{shown(line)}") from None
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise CheckpointError(f"{path}: the ranks of its {len(ranks)} tokens are not 0..{len(ranks) - 1}, each "
                                  f"once (a token listed twice, or a rank missing)")
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:  # tiktoken has no fallback for a byte without a token: it would panic encoding it
            raise CheckpointError(f"{path}: byte {missing[0]:#04x} has no token; a byte-level BPE has all 256")
        specials = {s: len(ranks) + i for i, s in enumerate(LLAMA3_SPECIALS)}
        self.model = tiktoken.Encoding(path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                       special_tokens=specials)
        self.n_words = self.model.n_vocab
        self.bos_id, self.eos_id = specials["<|begin_of_text|>"], specials["<|end_of_text|>"]
        self.stop_ids = {self.eos_id, specials["<|eot_id|>"]}

    def _encode(self, text):
        # tiktoken is slow on huge inputs and on very long runs of (non-)whitespace: as Meta does, encode
        # 400k-character chunks, cutting any run of over 25k whitespace or non-whitespace characters.
        ids = []
        for i in range(0, len(text), 400_000):
            chunk = text[i : i + 400_000]
            cuts = [m.start() + k for m in re.finditer(r"\s{25001,}|\S{25001,}", chunk)
                    for k in range(25_000, m.end() - m.start(), 25_000)]
            for a, b in zip([0] + cuts, cuts + [len(chunk)]):
                ids += self.model.encode(chunk[a:b], allowed_special=set(), disallowed_special=())
        return ids

    def encode_chat(self, text):
        return self.model.encode(text, allowed_special="all")

    def decode(self, ids):
        return self.model.decode(list(ids))


class HFTokenizer(Tokenizer):
    """Any Hugging Face tokenizer.json (BPE, byte-level or SentencePiece-style with byte fallback, Unigram,
    WordPiece, WordLevel; its normalizer, pre-tokenizer, added and special tokens, decoder), run by the
    `tokenizers` library as transformers runs it. encode leaves out the file's post-processor (zoo's
    bos/eos flags add those); added tokens in the text are recognised; decode keeps special tokens, as
    transformers' decode does by default. bos/eos: names or ids; end_of_text: as BPETokenizer's.
    add_bos False (tokenizer_config.json's add_bos_token): encode(bos=True) adds none, as transformers.
    clean_up_spaces (its clean_up_tokenization_spaces): decode then drops the space before . , ? ! and English
    contractions ('s, n't, ...), as transformers 5 does for every model but BPE, where it would corrupt text.
    """

    def __init__(self, path: Path, bos: str | int | None = None, eos: str | int | list | None = None,
                 files: dict[str, Path] | None = None, end_of_text: str | None = None, add_bos: bool = True,
                 clean_up_spaces: bool = False):
        import tokenizers
        self.files = files or {path.name: path}
        spec = read_json(path)
        model = spec.get("model")
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if isinstance(model, dict) and model.get("type") in ("BPE", "WordPiece", "WordLevel") and not (
                isinstance(vocab, dict) and all(is_int(i) and i >= 0 for i in vocab.values())):  # serde's says less
            raise CheckpointError(f"{path}: the vocabulary should map tokens (strings) to ids (ints >= 0), found "
                                  f"{shown(vocab)}")
        try:
            self.model = tokenizers.Tokenizer.from_str(json.dumps(_with_defaults(spec)))
        except BaseException as e:  # "data did not match any variant of ...", "missing field ...", or a panic
            if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
                raise  # KeyboardInterrupt, SystemExit
            raise CheckpointError(f"{path}: not a tokenizer.json that Hugging Face tokenizers reads "
                                  f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        vocab = self.model.get_vocab(with_added_tokens=True)
        self.added = {t.content: i for i, t in self.model.get_added_tokens_decoder().items()}
        self.n_words = max(vocab.values(), default=-1) + 1
        try:
            self.bos_id, self.eos_id, self.stop_ids = _specials(bos, eos, end_of_text, vocab.get)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        self.add_bos = add_bos
        self.clean_up_spaces = clean_up_spaces and type(self.model.model).__name__ != "BPE"

    def _encode(self, text):
        return self.model.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        # an id past the vocabulary (a model's padded embedding) decodes to nothing, as in Hugging Face
        text = self.model.decode([int(i) for i in ids if 0 <= int(i) < self.n_words], skip_special_tokens=False)
        if self.clean_up_spaces:  # transformers' clean_up_tokenization, in its order
            for spaced, joined in CLEAN_UP:
                text = text.replace(spaced, joined)
        return text


CLEAN_UP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


def _with_defaults(spec):
    """spec with the flags that a hand-written tokenizer.json may leave out and tokenizers' serde requires given
    the defaults of tokenizers' constructors: an added token's (not single_word, lstrip, rstrip; normalized
    unless special) and ByteLevel's (add_prefix_space, trim_offsets, use_regex)."""
    if isinstance(spec, list):
        return [_with_defaults(v) for v in spec]
    if not isinstance(spec, dict):
        return spec
    spec = {k: v if k == "model" else _with_defaults(v) for k, v in spec.items()}  # (not the vocabulary)
    if spec.get("type") == "ByteLevel":
        spec = {"add_prefix_space": True, "trim_offsets": True, "use_regex": True, **spec}
    if isinstance(spec.get("added_tokens"), list):
        spec["added_tokens"] = [{"single_word": False, "lstrip": False, "rstrip": False,
                                 "normalized": not t.get("special"), **t} if isinstance(t, dict) else t
                                for t in spec["added_tokens"]]
    return spec


def _specials(bos, eos, end_of_text, token_id) -> tuple[int | None, int | None, set[int]]:
    """bos_id, eos_id and stop_ids from bos and eos (tokens or ids; eos: or a list of them); token_id: a token's
    id or None. end_of_text, when the vocabulary has it, is the eos and the one stop id."""
    def id_of(token):
        if token is None or is_int(token):
            return token
        if not isinstance(token, str):
            raise ValueError(f"special token {shown(token)} is neither a token (a string) nor an id (an int)")
        if token_id(token) is None:
            raise ValueError(f"special token {token!r} is not in the tokenizer's vocabulary")
        return token_id(token)

    eos_all = eos if isinstance(eos, list) else [eos]
    if end_of_text is not None and token_id(end_of_text) is not None:
        eos_all = [end_of_text]
    return id_of(bos), id_of(eos_all[0]), {id_of(e) for e in eos_all} - {None}


class BPETokenizer(Tokenizer):
    """A byte-level BPE (GPT-2's scheme), encoded by tiktoken on zoo.bpe's ranks; `rank_to_id` maps back to the
    file's ids. Added tokens (special or not) are recognised in the text, as Hugging Face does.
    Built from GPT-2's `vocab.json` + `merges.txt` (a `tokenizer.json` is HFTokenizer's).
    end_of_text: a token that, when the vocabulary has it, is the eos and the one stop id (gpt-neox's
    <|endoftext|>), whatever `eos` says.
    """

    def __init__(self, vocab: dict[str, int], merges: list, added: dict[str, int], pattern: str,
                 prefix_space: bool = False, bos: str | int | None = None, eos: str | int | list | None = None,
                 name: str = "bpe", unk: int | None = None, files: dict[str, Path] | None = None,
                 end_of_text: str | None = None):
        import tiktoken
        self.files = files or {}
        mergeable, self.rank_to_id, self.id_to_bytes = bpe.ranks(vocab, merges, added, unk)
        self.added, self.token_ids = added, {**vocab, **added}
        specials = {text: len(mergeable) + k for k, text in enumerate(added)}
        self.prefix_space = prefix_space
        self.model = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=mergeable, special_tokens=specials)
        self.n_words = max(self.id_to_bytes) + 1
        self.bos_id, self.eos_id, self.stop_ids = _specials(bos, eos, end_of_text, self.token_ids.get)

    @classmethod
    def read(cls, sources: list[Path], *args, **kwargs) -> "BPETokenizer":
        """cls(*args, **kwargs), an error in the tables naming the files they were read from."""
        try:
            return cls(*args, **kwargs)
        except CheckpointError:
            raise
        except ValueError as e:  # ours above, or tiktoken's for a pattern it cannot compile
            raise CheckpointError(f"{' and '.join(map(str, sources))}: {e}") from None

    @classmethod
    def from_vocab_merges(cls, vocab: Path, merges: Path, added: dict[str, int], bos=None, eos=None,
                          **kwargs) -> "BPETokenizer":
        """GPT-2's files: vocab.json (token -> id) and merges.txt (a '#version' line, then 'left right' per line)."""
        return cls.read([vocab, merges], read_json(vocab), bpe.merge_lines(merges), added, bpe.GPT2_PATTERN, False, bos, eos,
                        name=vocab.name, **{"files": {vocab.name: vocab, merges.name: merges}, **kwargs})

    @classmethod
    def from_fairseq(cls, vocab: Path, merges: Path, dictionary: Path, **kwargs) -> "BPETokenizer":
        """metaseq's (fairseq's) files for OPT: GPT-2's vocab.json and merges.txt, and dict.txt, which
        renumbers them: the model's id of GPT-2 id g is 4 + the line of g in dict.txt, after <s>, <pad>,
        </s>, <unk> (0..3). A token that dict.txt lacks encodes as <unk>, as fairseq does; </s> starts
        and ends a document."""
        gpt2 = read_json(vocab)
        entries = [line.split(" ")[0] for line in read_utf8(dictionary).splitlines() if line.strip()]
        line_of = {entry: 4 + i for i, entry in enumerate(entries)}
        renumbered = {token: line_of[str(i)] for token, i in gpt2.items() if str(i) in line_of}
        specials = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
        return cls.read([vocab, merges, dictionary], renumbered, bpe.merge_lines(merges), specials, bpe.GPT2_PATTERN, False,
                        "</s>", "</s>", name=dictionary.name, unk=3,
                        **{"files": {vocab.name: vocab, merges.name: merges, dictionary.name: dictionary}, **kwargs})

    def _encode(self, text):
        if self.prefix_space and not text.startswith(" "):
            text = " " + text
        ids = self.rank_to_id[self.model.encode(text, allowed_special="all")]
        if (ids < 0).any():
            raise ValueError("the text has a byte that the tokenizer's vocabulary lacks")
        return ids.tolist()

    def decode(self, ids):
        # Models pad their vocabulary past the tokenizer's (OPT 50272 vs 50265, Pythia 50304 vs 50277):
        # an id with no token decodes to nothing, as in Hugging Face.
        return b"".join(self.id_to_bytes.get(int(i), b"") for i in ids).decode("utf-8", errors="replace")


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "dict.txt", "gpt2-vocab.json", "gpt2-merges.txt")
def load_tokenizer(directory: Path, config: dict | None = None, config_file: Path | None = None) -> Tokenizer | None:
    """The tokenizer stored beside a checkpoint (its chat template read by read_chat_template), or None.
    The reading: _read_tokenizer."""
    tokenizer = _read_tokenizer(directory, config, config_file)
    if tokenizer is not None:
        tokenizer.chat_template = read_chat_template(directory)
    return tokenizer


def _read_tokenizer(directory: Path, config: dict | None, config_file: Path | None) -> Tokenizer | None:
    """The tokenizer stored beside a checkpoint, or None if there is none.

    `tokenizer.model` comes first (SentencePiece or tiktoken, told apart by its content); else a
    `tokenizer.json` of any kind (HFTokenizer), else metaseq's `dict.txt` with GPT-2's files, else GPT-2's
    `vocab.json` + `merges.txt` (OPT), with bos/eos ids from config.json, or their names from
    tokenizer_config.json (and its add_bos_token, for a tokenizer.json). Its `files` are the
    TOKENIZER_FILES the directory holds. A file that cannot be read as its kind is a CheckpointError
    naming it (config_file: where `config` came from).
    """
    files = {name: directory / name for name in TOKENIZER_FILES if (directory / name).exists()}
    model = directory / "tokenizer.model"
    if model.exists():
        first = model.read_bytes()[:256].split(b"\n")[0]
        if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", first):
            return TiktokenTokenizer(model, files)
        return SentencePieceTokenizer(model, files)
    config = config or {}
    bos, eos = config.get("bos_token_id"), config.get("eos_token_id")
    ids = is_int(bos) or bos is None, is_int(eos) or eos is None or (isinstance(eos, list) and all(map(is_int, eos)))
    if not all(ids):
        raise CheckpointError(f"{config_file or directory}: {'bos_token_id' if not ids[0] else 'eos_token_id'} "
                              f"{shown(bos if not ids[0] else eos)} is not a token id (an int; eos: or a list of them)")
    named_file = directory / "tokenizer_config.json"
    named = read_json(named_file) if named_file.exists() else {}
    content = lambda t: t.get("content") if isinstance(t, dict) else t  # noqa: E731
    bos = bos if bos is not None else content(named.get("bos_token"))
    eos = eos if eos is not None else content(named.get("eos_token"))
    decoder = named.get("added_tokens_decoder", {})
    if not isinstance(decoder, dict) or not all(i.isdigit() and isinstance(content(t), str) for i, t in decoder.items()):
        raise CheckpointError(f"{named_file}: added_tokens_decoder should map ids to tokens, found {shown(decoder)}")
    for name, token in (("bos_token", bos), ("eos_token", eos)):
        if not (token is None or isinstance(token, (str, int, list))):
            raise CheckpointError(f"{named_file}: {name} {shown(token)} is not a token (a string, or an object with "
                                  f"its \"content\")")
    add_bos, clean_up = named.get("add_bos_token", True), named.get("clean_up_tokenization_spaces", False)
    for name, flag in (("add_bos_token", add_bos), ("clean_up_tokenization_spaces", clean_up)):
        if not isinstance(flag, bool):
            raise CheckpointError(f"{named_file}: {name} {shown(flag)} is not true or false")
    if (directory / "tokenizer.json").exists():
        return HFTokenizer(directory / "tokenizer.json", bos, eos, files, add_bos=add_bos, clean_up_spaces=clean_up)
    vocab = next((directory / f for f in ("gpt2-vocab.json", "vocab.json") if (directory / f).exists()), None)
    merges = next((directory / f for f in ("gpt2-merges.txt", "merges.txt") if (directory / f).exists()), None)
    if (directory / "dict.txt").exists() and vocab and merges and (
            vocab.name == "gpt2-vocab.json" or "</s>" not in read_json(vocab)):
        # metaseq's OPT files; a vocab.json with </s> is Hugging Face's, already in the model's ids
        return BPETokenizer.from_fairseq(vocab, merges, directory / "dict.txt", files=files)
    if (directory / "vocab.json").exists() and (directory / "merges.txt").exists():
        added = {content(t): int(i) for i, t in decoder.items()}
        return BPETokenizer.from_vocab_merges(directory / "vocab.json", directory / "merges.txt", added, bos, eos,
                                              files=files)
    return None
