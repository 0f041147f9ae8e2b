"""CLIP prompt tokenizer for the runtime: numpy + `tokenizers` + stdlib, no transformers.

`PromptTokenizer.encode` returns what transformers' slow `CLIPTokenizer(prompts, padding="max_length",
max_length=..., truncation=True).input_ids` returns, the class diffusers pipelines load, as it runs without
ftfy (ftfy is not a dependency of diffusers or transformers; where it is installed the slow tokenizer cleans
text with ftfy.fix_text instead, which differs on curly quotes, full-width letters, CJK and the like).

The slow tokenizer cleans text with BERT's BasicTokenizer before its BPE: it drops control and format
characters, puts spaces around CJK ideographs, applies NFC and lowercases word by word. A tokenizer.json
cannot express the first two steps (CLIPTokenizerFast skips them and differs on e.g. Chinese prompts), so
`_clean_prompt` does the whole cleaning here and the `tokenizers` BPE runs without a normalizer.
"""

from __future__ import annotations

import re
import sys
import unicodedata
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from basinguard.errors import first_line
from basinguard.model_format import read_json
from basinguard.runtime.errors import ModelFolderError

CLIP_CONTEXT = 77  # CLIP's text context; used when the folder does not state a usable model_max_length
_MAX_SANE_LENGTH = 4096  # transformers writes ~1e30 for "no limit"; anything above this is treated as unset
_CLIP_MERGES_LIMIT = 49152 - 256 - 2  # the slow tokenizer reads at most this many merges (CLIP's BPE size)
_CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""  # CLIP's word pattern
_CLIP_LITERALS = ("<|startoftext|>", "<|endoftext|>")  # the slow BPE regex keeps these whole in cleaned text
_DEFAULTS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
             "pad_token": "<|endoftext|>"}  # CLIPTokenizer's constructor defaults
# Unicode blocks that BERT's BasicTokenizer (and so the slow CLIPTokenizer) treats as CJK ideographs.
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))

# U+0345 matches no alternative of the slow tokenizer's case-insensitive word pattern (it case-folds to a
# letter but is not one), so there it separates words and vanishes; `_clean_prompt` turns it into a space.
# The one known divergence left: "'ſ" (long s after an apostrophe) is one piece there, two here.
_SEPARATOR = "\u0345"


_TRUNCATIONS_SHOWN: dict = {}  # warnings' registry for PromptTruncatedWarning (see `PromptTokenizer.encode`)


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the text encoder takes; the message names the dropped words."""


@contextmanager
def quiet_truncation() -> Iterator[None]:
    """PromptTruncatedWarning silenced, where the caller names each cut prompt once itself (with its line or flag)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        yield


@dataclass(frozen=True)
class Truncation:
    """A prompt cut to the text encoder's length, as diffusers cuts it: its token count, the tokens kept (start and
    end tokens aside) and the words dropped."""

    tokens: int
    kept: int
    dropped: str

    def describe(self, prompt: str) -> str:
        """One line: the prompt's start and the dropped words' start with their count (a 100 KB prompt is no
        100 KB message)."""
        head = prompt if len(prompt) <= 40 else prompt[:40] + "…"
        message = f"prompt {head!r} has {self.tokens} tokens but the text encoder takes {self.kept}; dropped: "
        if len(self.dropped) <= 80:
            return message + repr(self.dropped)
        return message + f"{self.dropped[:80] + '…'!r} ({self.tokens - self.kept} tokens in all)"

    def refusal(self, what: str) -> str:
        """Why `what` (e.g. "prompt", "--negative-prompt") is refused with --long-prompts error."""
        return (f"{what} has {self.tokens} tokens; the text encoder takes at most {self.kept} (start and end tokens "
                "aside; --long-prompts error, where the default truncates as diffusers does)")

    def record(self) -> dict:
        """As traces and manifest lines keep it."""
        return {"tokens": self.tokens, "kept": self.kept, "dropped": self.dropped}


def prompt_text(text: str) -> str:
    """The one rule for a prompt's text, from any prompt file or flag: without surrounding whitespace and without
    byte-order marks (U+FEFF, invisible, where files were joined), which the tokenizer drops anyway."""
    return text.replace("\ufeff", "").strip()


def text_encoder_length(encoder: Path) -> int | None:
    """The most input_ids a text encoder folder takes: its config.json's max_position_embeddings, else unknown."""
    path = encoder / "config.json"
    if not path.is_file():
        return None
    value = read_json(path).get("max_position_embeddings")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= _MAX_SANE_LENGTH:
        raise ModelFolderError(f"corrupt config {path}: max_position_embeddings must be an integer in "
                               f"[2, {_MAX_SANE_LENGTH}], not {value!r}")
    return value


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte → printable character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)  # unprintable bytes move past Latin-1 so every byte is a visible char
            extra += 1
    return {b: table[b] for b in [*printable, *(b for b in range(256) if b not in printable)]}


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _clean_char(ch: str) -> str:
    """One character as BasicTokenizer leaves it: removed, a space, spaced (CJK) or unchanged."""
    if ch in "\t\n\r ":
        return " "
    category = unicodedata.category(ch)
    if category.startswith("C") or ch == "\ufffd":  # control, format, private, unassigned, surrogate
        return ""
    if category == "Zs":
        return " "
    return f" {ch} " if _is_cjk(ord(ch)) else ch


def _clean_prompt(text: str) -> str:
    """The slow CLIPTokenizer's text cleaning (BasicTokenizer without punctuation split or accent strip)."""
    text = unicodedata.normalize("NFC", "".join(_clean_char(ch) for ch in text))
    text = " ".join(word.lower() for word in text.split())
    return " ".join(text.replace(_SEPARATOR, " ").split()) if _SEPARATOR in text else text


def _token_text(value: Any) -> str | None:
    """A special token as saved by transformers: a string or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(folder: Path) -> dict[str, str]:
    """bos/eos/unk/pad with transformers' precedence.

    A tokenizer_config.json with `added_tokens_decoder` (transformers >= 4.34) is authoritative; in older
    folders (e.g. SD 2.x: pad "!" in special_tokens_map.json, "<|endoftext|>" in tokenizer_config.json)
    special_tokens_map.json wins.
    """
    config_path, map_path = folder / "tokenizer_config.json", folder / "special_tokens_map.json"
    config = read_json(config_path) if config_path.exists() else {}
    token_map = read_json(map_path) if map_path.exists() else {}
    sources = (config, token_map) if "added_tokens_decoder" in config else (token_map, config)
    tokens = {}
    for key, default in _DEFAULTS.items():
        found = (_token_text(src.get(key)) for src in sources)
        tokens[key] = next((t for t in found if t), default)
    return tokens


def stated_max_length(folder: Path) -> int | None:
    """tokenizer_config.json's model_max_length, or None where the folder states no usable one (no file, no field,
    transformers' ~1e30 for "no limit")."""
    path = folder / "tokenizer_config.json"
    value = read_json(path).get("model_max_length") if path.exists() else None
    if value is None or isinstance(value, bool) or not isinstance(value, int | float) or value > _MAX_SANE_LENGTH:
        return None
    if value < 2:
        raise ModelFolderError(f"{path}: model_max_length {value} leaves no room for the start and end tokens")
    return int(value)


def padded_length(folder: Path, encoder_length: int | None, exact: bool = False) -> int:
    """The length a tokenizer folder's prompts are padded to: the stated one, else the text encoder's
    (`encoder_length`, `text_encoder_length`), else CLIP's. A stated length the text encoder cannot take (longer, or
    with `exact` another: a fixed ONNX input) would fail deep inside the runtime on the first prompt: refused here,
    naming both."""
    stated = stated_max_length(folder)
    if stated is None:
        return CLIP_CONTEXT if encoder_length is None else encoder_length
    if encoder_length is not None and (stated > encoder_length or exact and stated != encoder_length):
        raise ModelFolderError(f"{folder / 'tokenizer_config.json'}: model_max_length {stated}, but the text encoder "
                               f"takes input_ids of {'' if exact else 'at most '}length {encoder_length}; set "
                               f"model_max_length to {encoder_length} (or remove it)")
    return stated


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt as the slow CLIPTokenizer reads it: skip the "#version" header, keep CLIP's merge count."""
    try:
        lines = path.read_text(encoding="utf-8").strip().split("\n")
    except FileNotFoundError:
        raise ModelFolderError(f"missing file: {path}") from None
    except UnicodeDecodeError as exc:
        raise ModelFolderError(f"corrupt {path}: not UTF-8 ({exc})") from None
    if lines and lines[0].startswith("#"):
        lines = lines[1:]
    merges = []
    for number, line in enumerate(lines[:_CLIP_MERGES_LIMIT], start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ModelFolderError(f"corrupt {path}: line {number} is {line!r}, expected two symbols")
        merges.append((parts[0], parts[1]))
    return merges


def _clip_bpe(folder: Path, unk_token: str) -> Tokenizer:
    """A `tokenizers` BPE equivalent to the slow CLIPTokenizer, from vocab.json + merges.txt."""
    vocab_path = folder / "vocab.json"
    vocab = read_json(vocab_path)
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise ModelFolderError(f"corrupt {vocab_path}: expected a JSON object of token → id")
    merges = _read_merges(folder / "merges.txt")
    try:
        model = models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                           fuse_unk=False, unk_token=unk_token)
    except Exception as exc:  # tokenizers raises a bare Exception for merges that reference unknown symbols
        raise ModelFolderError(f"{folder / 'merges.txt'} does not fit {vocab_path}: {exc}") from None
    tok = Tokenizer(model)  # no normalizer: `_clean_prompt` does CLIP's normalization (see `_bare`)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _load_tokenizer_json(path: Path) -> Tokenizer:
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
        raise ModelFolderError(f"corrupt {path}: {first_line(exc)}") from None
    return tok


def _bare(tok: Tokenizer) -> Tokenizer:
    """Only the BPE model, pre-tokenizer and decoder: normalization, added and special tokens, padding and
    truncation are left to PromptTokenizer, the same for any source.

    A CLIP tokenizer.json normalizes with NFC → whitespace → lowercase. `_clean_prompt` already did that in
    the slow tokenizer's order (NFC, then lowercase); a second NFC after lowercasing would reorder combining
    marks (e.g. "İ" + virama lowercases to i + U+0307 + U+094D, which NFC reorders) and change the ids.
    A tokenizer.json's added tokens go too: they would match in cleaned text (see `_register_added`).
    """
    bare = Tokenizer(tok.model)
    bare.pre_tokenizer, bare.decoder = tok.pre_tokenizer, tok.decoder
    return bare


def _added_tokens(folder: Path, from_tokenizer_json: dict[int, AddedToken]) -> list[tuple[int, AddedToken]]:
    """Extra tokens (e.g. textual-inversion words) from tokenizer_config.json's added_tokens_decoder, else from where
    older transformers kept them: tokenizer.json's added_tokens (`from_tokenizer_json`) and added_tokens.json."""
    found = {token.content: (index, token) for index, token in from_tokenizer_json.items()}
    legacy = folder / "added_tokens.json"  # {content: id}, written before transformers 4.34
    if legacy.is_file():
        entries = read_json(legacy)
        if not isinstance(entries, dict) or not all(isinstance(v, int) for v in entries.values()):
            raise ModelFolderError(f"corrupt {legacy}: expected an object of token → id")
        for content, index in entries.items():
            found.setdefault(content, (index, AddedToken(content)))
    for index, token in _config_added_tokens(folder):
        found[token.content] = (index, token)  # the config's own entry wins: it has the flags transformers used
    return sorted(found.values(), key=lambda pair: pair[0])


def _config_added_tokens(folder: Path) -> list[tuple[int, AddedToken]]:
    path = folder / "tokenizer_config.json"
    decoder = read_json(path).get("added_tokens_decoder", {}) if path.exists() else {}
    if not isinstance(decoder, dict):
        raise ModelFolderError(f"corrupt {path}: added_tokens_decoder is not an object of id → token")
    added = []
    for key, spec in sorted(decoder.items(), key=lambda kv: int(kv[0])):
        if not isinstance(spec, dict) or not isinstance(spec.get("content"), str):
            raise ModelFolderError(f"corrupt {path}: added_tokens_decoder[{key}] has no string content")
        token = AddedToken(spec["content"], single_word=bool(spec.get("single_word", False)),
                           lstrip=bool(spec.get("lstrip", False)), rstrip=bool(spec.get("rstrip", False)),
                           normalized=bool(spec.get("normalized", False)), special=bool(spec.get("special", False)))
        added.append((int(key), token))
    return added


def _register_added(tok: Tokenizer, folder: Path, specials: dict[str, str],
                    from_tokenizer_json: dict[int, AddedToken]) -> dict[str, tuple[int, AddedToken]]:
    """Added and special tokens, content → (id, token), for `_split_added` to find in the raw prompt.

    `tok` gets only CLIP's two literals, which the slow BPE regex also keeps whole in cleaned text; any other
    token there would match after lowercasing too ("SKS" as the added "sks"), which the slow tokenizer never does.
    """
    added = {}
    for index, token in _added_tokens(folder, from_tokenizer_json):
        if tok.token_to_id(token.content) not in (None, index):
            raise ModelFolderError(f"{folder / 'tokenizer_config.json'}: added token {token.content!r} has id "
                                   f"{index} but the vocabulary gives it {tok.token_to_id(token.content)}")
        added[token.content] = (index, token)  # a new word's id is the config's, as in the slow tokenizer
    # Only tokens the vocabulary has: a new id would be outside the text encoder's embedding table.
    for text in dict.fromkeys(specials.values()):
        if text not in added and tok.token_to_id(text) is not None:
            added[text] = (tok.token_to_id(text), AddedToken(text, special=True))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in _CLIP_LITERALS
                            if tok.token_to_id(t) is not None])
    return added


def _split_added(pattern: re.Pattern[str] | None, text: str, added: dict[str, tuple[int, AddedToken]]) -> list[str]:
    """Raw text cut into added tokens and the text between, with the slow tokenizer's `tokenize` quirks:
    lstrip/rstrip eat the neighbour's whitespace, a single_word token not between spaces rejoins its text."""
    parts = [p for p in pattern.split(text) if p] if pattern else [text]
    for i, part in enumerate(parts):
        if part not in added:
            continue
        token = added[part][1]
        left, right = parts[i - 1] if i > 0 else None, parts[i + 1] if i + 1 < len(parts) else None
        if token.rstrip and right:
            parts[i + 1] = right.lstrip()
        if token.lstrip and left:
            parts[i - 1] = left.rstrip()
        if token.single_word and left and left[-1] != " ":  # tests the unstripped neighbour, as transformers does
            parts[i - 1], parts[i] = parts[i - 1] + part, ""
        elif token.single_word and right and right[0] != " ":
            parts[i + 1], parts[i] = part + parts[i + 1], ""
    return parts


@dataclass
class PromptTokenizer:
    """Prompts → int64 ids (N, max_length): start token, BPE tokens, end token, then pad tokens."""

    tokenizer: Tokenizer
    max_length: int
    bos_id: int
    eos_id: int
    pad_id: int
    added: dict[str, tuple[int, AddedToken]] = field(default_factory=dict)  # content → (id, token)
    _pattern: re.Pattern[str] | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        # Longest first: of two tokens starting at one place the longer wins, as in the slow tokenizer's trie.
        if self.added:
            self._pattern = re.compile("(" + "|".join(map(re.escape, sorted(self.added, key=len, reverse=True))) + ")")

    @classmethod
    def from_folder(cls, folder: Path, encoder_length: int | None = None, exact: bool = False) -> PromptTokenizer:
        """Load a diffusers/optimum `tokenizer/` folder: tokenizer.json, else vocab.json + merges.txt.
        `encoder_length`: the most input_ids its text encoder takes, where known (`text_encoder_length`); with
        `exact`, the only length it takes (a fixed ONNX input)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelFolderError(f"tokenizer folder not found: {folder}")
        specials = _special_tokens(folder)
        if (folder / "tokenizer.json").is_file():
            tok = _load_tokenizer_json(folder / "tokenizer.json")
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            tok = _clip_bpe(folder, specials["unk_token"])
        else:
            raise ModelFolderError(f"tokenizer folder {folder} has neither tokenizer.json nor vocab.json + merges.txt")
        from_json = tok.get_added_tokens_decoder() if (folder / "tokenizer.json").is_file() else {}
        tok = _bare(tok)
        added = _register_added(tok, folder, specials, from_json)
        ids = {}
        for key in ("bos_token", "eos_token", "pad_token"):
            ids[key] = tok.token_to_id(specials[key])
            if ids[key] is None:
                raise ModelFolderError(f"tokenizer folder {folder}: {key} {specials[key]!r} is not in the vocabulary")
        return cls(tok, padded_length(folder, encoder_length, exact), ids["bos_token"], ids["eos_token"],
                   ids["pad_token"], added)

    def tokenize(self, prompt: str) -> list[int]:
        """Token ids of one prompt, without start/end tokens and untruncated.

        As in the slow tokenizer, added tokens are found in the raw prompt (case-sensitively) and only the text
        between them is cleaned, lowercased and BPE-encoded; a prompt without any is one `encode` call.
        """
        ids: list[int] = []
        for part in _split_added(self._pattern, prompt, self.added):
            if part in self.added:
                ids.append(self.added[part][0])
            elif part:
                ids += self.tokenizer.encode(_clean_prompt(part), add_special_tokens=False).ids
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of token ids, words separated by single spaces (CLIP marks word ends with "</w>")."""
        names = {i: content for content, (i, _) in self.added.items()}
        table = _unicode_to_bytes()

        def piece(i: int) -> bytes:
            if i in names:  # an added token is a word of its own, stored as text, not as byte-level symbols
                return f" {names[i]} ".encode()
            text = (self.tokenizer.id_to_token(i) or "").replace("</w>", " ")
            return b"".join(bytes([table[c]]) if c in table else c.encode("utf-8") for c in text)

        return " ".join(b"".join(map(piece, ids)).decode("utf-8", errors="replace").split())

    def truncation(self, prompt: str, ids: list[int] | None = None) -> Truncation | None:
        """What the text encoder would not see of `prompt` (its `tokenize` ids, if already made), or None."""
        ids = self.tokenize(prompt) if ids is None else ids
        room = self.max_length - 2  # start and end tokens take two of the text encoder's positions
        return Truncation(len(ids), room, self.decode(ids[room:])) if len(ids) > room else None

    def encode(self, prompts: list[str]) -> np.ndarray:
        """int64 (N, max_length) ids; a prompt that does not fit is cut and a PromptTruncatedWarning names the rest."""
        if isinstance(prompts, str):  # a bare string would otherwise be tokenized character by character
            prompts = [prompts]
        room = self.max_length - 2
        out = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids = self.tokenize(prompt)
            cut = self.truncation(prompt, ids)
            if cut is not None:
                message = cut.describe(prompt)
                # As warnings.warn(stacklevel=2) would, each text once, but with a registry of our own that is
                # bounded: warnings.warn keeps every distinct text for good, and a service cuts many prompts.
                if len(_TRUNCATIONS_SHOWN) > 1024:
                    _TRUNCATIONS_SHOWN.clear()
                caller = sys._getframe(1)
                warnings.warn_explicit(message, PromptTruncatedWarning, caller.f_code.co_filename, caller.f_lineno,
                                       module=caller.f_globals.get("__name__"), registry=_TRUNCATIONS_SHOWN)
                ids = ids[:room]
            out[row, : len(ids) + 2] = [self.bos_id, *ids, self.eos_id]
        return out
