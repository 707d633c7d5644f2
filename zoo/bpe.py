"""GPT-2's byte-level BPE tables (vocab.json + merges.txt) as tiktoken's mergeable ranks.

tiktoken merges the adjacent pair whose concatenation has the lowest rank, so a token's rank is the
position of the merge that first makes it (the 256 bytes come first). zoo.tokenizer.BPETokenizer
encodes with these ranks and maps each rank back to the file's id.
"""
from pathlib import Path

import numpy as np

from zoo.checks import is_int, read_utf8, shown

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest for chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def merge_lines(merges: Path) -> list[str]:
    """GPT-2's merges.txt: a '#version' line, then 'left right' per line."""
    return [line for line in read_utf8(merges).split("\n") if line and not line.startswith("#version")]


def ranks(vocab: dict[str, int], merges: list, added: dict[str, int], unk: int | None = None
          ) -> tuple[dict[bytes, int], np.ndarray, dict[int, bytes]]:
    """(tiktoken's mergeable ranks, rank_to_id: int64 [ranks + len(added)], id_to_bytes) from a vocabulary
    (token -> id), its merges ('left right' or [left, right]) and added tokens (text -> id, ranked after the
    merges in their order). A rank whose token the vocabulary lacks maps to unk (None: -1). ValueError names
    the first entry that is wrong."""
    for what, table in (("vocabulary", vocab), ("added tokens", added)):
        if not isinstance(table, dict) or not all(isinstance(t, str) and is_int(i) and i >= 0 for t, i in table.items()):
            raise ValueError(f"the {what} should map tokens (strings) to ids (ints >= 0), found {shown(table)}")
    if not isinstance(merges, list):
        raise ValueError(f"the merges should be a list, found {shown(merges)}")
    to_byte = byte_decoder()

    def as_bytes(token: str) -> bytes:
        if any(c not in to_byte for c in token):
            raise ValueError(f"token {token!r} has a character outside GPT-2's byte-level alphabet")
        return bytes(to_byte[c] for c in token)

    mergeable = {bytes([b]): b for b in range(256)}
    for merge in merges:
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(t, str) for t in pair):
            raise ValueError(f"merge {shown(merge)} is not two tokens ('left right' or [left, right])")
        mergeable.setdefault(as_bytes(pair[0]) + as_bytes(pair[1]), len(mergeable))
    rank_to_id = np.full(len(mergeable), -1 if unk is None else unk, dtype=np.int64)  # -1: not in the vocab
    id_to_bytes = {}
    for tok, i in vocab.items():
        id_to_bytes[i] = as_bytes(tok)
        if id_to_bytes[i] in mergeable:
            rank_to_id[mergeable[id_to_bytes[i]]] = i
    for text, i in added.items():
        id_to_bytes[i] = text.encode()
    return mergeable, np.concatenate([rank_to_id, np.array(list(added.values()), dtype=np.int64)]), id_to_bytes
