"""PromptTokenizer against transformers' CLIPTokenizer on the real CLIP vocabulary (built offline from open_clip's
BPE file), through both a tokenizer.json folder and a vocab.json + merges.txt folder."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from basinguard.runtime.errors import ModelFolderError
from basinguard.runtime.tokenizer import PromptTokenizer, PromptTruncatedWarning, bytes_to_unicode

transformers = pytest.importorskip("transformers")
from transformers import AddedToken, CLIPTokenizer, CLIPTokenizerFast  # noqa: E402
from transformers.models.clip.tokenization_clip import bytes_to_unicode as hf_bytes_to_unicode  # noqa: E402

LONG = ", ".join(f"detailed painting of a castle number {i}" for i in range(30))
PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "A PHOTO OF A CAT, Highly Detailed; 8K!!!",
    "",
    "   ",
    "  leading and trailing   spaces\t\ttabs\nnewlines\r\n",
    "it's don't I'M we'll THEY'RE you've he'd '''s",
    "numbers 1234567 3.14159 $100 50% 2nd 1/2",
    "(masterpiece:1.2), [[best quality]], {cat|dog}, <lora:foo:0.7>",
    "émigré café naïve façade Ångström",
    "e\u0301le\u0300ve combining accents",
    "ΣΑΣ ΟΔΥΣΣΕΥΣ greek final sigma",
    "İstanbul straße GROẞE",
    "日本の猫 你好世界 中文提示词",
    "こんにちは カタカナ 한국어 프롬프트",
    "مرحبا بالعالم עברית",
    "हिन्दी संस्कृतम् தமிழ்",
    "emoji 🐱🚀 family 👨\u200d👩\u200d👧 flag 🇫🇷",
    "ＦＵＬＬＷＩＤＴＨ ａｂｃ １２３",
    "zero\u200bwidth soft\u00adhyphen nbsp\u00a0space ideo\u3000space line\u2028sep",
    "controls\x00\x07\x1b\x7f here \ufffd replacement \ue000 private \ud800 surrogate",
    "a cat<|endoftext|>a dog",
    "<|startoftext|> explicit <|ENDOFTEXT|> upper",
    "ellipsis… quotes “curly” ‘single’ — dash – en",
    "hello!! world!? ¡hola! ...",
    "snake_case kebab-case CamelCase dot.separated path/to/file",
    "aͅb ᾳ ᾼΣ İ् मİ्",  # U+0345 separates words; İ lowercases to i + U+0307 next to a virama
    LONG,
]


def _clip_open_vocab() -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary as CLIP builds it from bpe_simple_vocab_16e6.txt.gz."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch (for its BPE file) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    base = list(hf_bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, [" ".join(m) for m in merges]


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    vocab, merges = _clip_open_vocab()
    folder = tmp_path_factory.mktemp("clip_files")
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def _without_ftfy(make: Callable[[], CLIPTokenizer]) -> CLIPTokenizer:
    """The slow tokenizer as diffusers users without ftfy get it (ftfy is not a diffusers/transformers
    dependency): with ftfy importable, CLIPTokenizer cleans text with ftfy.fix_text instead of BasicTokenizer."""
    with mock.patch.dict(sys.modules, {"ftfy": None}):  # makes `import ftfy` raise ImportError
        slow = make()
    assert slow.fix_text is None
    return slow


def _slow_folder(files: Path, dest: Path, **kwargs: object) -> tuple[Path, CLIPTokenizer]:
    """A folder saved by the slow tokenizer (vocab.json, merges.txt, configs; no tokenizer.json)."""
    slow = _without_ftfy(lambda: CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"),
                                               model_max_length=77, **kwargs))
    slow.save_pretrained(dest)
    assert not (dest / "tokenizer.json").exists()
    return dest, slow


@pytest.fixture(scope="module")
def sd1(clip_files: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CLIPTokenizer]:
    return _slow_folder(clip_files, tmp_path_factory.mktemp("sd1_slow"))


@pytest.fixture(scope="module")
def sd1_json(sd1: tuple[Path, CLIPTokenizer], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tokenizer converted by CLIPTokenizerFast, saved with a tokenizer.json."""
    dest = tmp_path_factory.mktemp("sd1_fast")
    CLIPTokenizerFast.from_pretrained(sd1[0], from_slow=True).save_pretrained(dest)
    assert (dest / "tokenizer.json").exists()
    return dest


def _reference(slow: CLIPTokenizer, prompts: list[str], max_length: int = 77) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = slow(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
    return out["input_ids"].astype(np.int64)


def _encode_quiet(tok: PromptTokenizer, prompts: list[str]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        return tok.encode(prompts)


def test_bytes_to_unicode_matches_clip() -> None:
    assert bytes_to_unicode() == hf_bytes_to_unicode()


@pytest.mark.parametrize("source", ["vocab_merges", "tokenizer_json"])
def test_encode_matches_slow_clip_tokenizer(source: str, sd1: tuple[Path, CLIPTokenizer], sd1_json: Path) -> None:
    folder = sd1[0] if source == "vocab_merges" else sd1_json
    tok = PromptTokenizer.from_folder(folder)
    assert tok.max_length == 77
    ours = _encode_quiet(tok, PROMPTS)
    ref = _reference(sd1[1], PROMPTS)
    assert ours.dtype == np.int64 and ours.shape == (len(PROMPTS), 77)
    for prompt, a, b in zip(PROMPTS, ours, ref, strict=True):
        assert a.tolist() == b.tolist(), f"mismatch for {prompt!r}"


def _random_prompt(rng: random.Random) -> str:
    chars = []
    for _ in range(rng.randint(0, 30)):
        r = rng.random()
        # half ASCII, then Latin..CJK symbols, then CJK, Hangul, emoji and the supplementary ideographs
        low, high = (0x20, 0x7E) if r < 0.5 else (0xA0, 0x3000) if r < 0.85 else (0x3000, 0x2FFFF)
        cp = rng.randint(low, high)
        chars.append(chr(cp) if not 0xD800 <= cp <= 0xDFFF else " ")
    return "".join(chars)


def test_random_unicode_matches_slow(sd1: tuple[Path, CLIPTokenizer], sd1_json: Path) -> None:
    rng = random.Random(1234)
    prompts = [_random_prompt(rng) for _ in range(400)]
    ref = _reference(sd1[1], prompts).tolist()
    for folder in (sd1[0], sd1_json):
        ours = _encode_quiet(PromptTokenizer.from_folder(folder), prompts).tolist()
        mismatches = [p for p, a, b in zip(prompts, ours, ref, strict=True) if a != b]
        assert not mismatches, f"{len(mismatches)} mismatches, e.g. {mismatches[:3]!r}"


def test_layout_of_ids(sd1: tuple[Path, CLIPTokenizer]) -> None:
    tok = PromptTokenizer.from_folder(sd1[0])
    ids = tok.encode(["a cat", ""])
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (49406, 49407, 49407)
    assert ids[0, :4].tolist() == [49406, 320, 2368, 49407] and (ids[0, 4:] == 49407).all()
    assert ids[1, :2].tolist() == [49406, 49407]
    assert tok.encode("a cat").tolist() == ids[:1].tolist()  # a bare string is one prompt


def test_fast_tokenizer_differs_on_cjk_but_we_follow_slow(sd1: tuple[Path, CLIPTokenizer], sd1_json: Path) -> None:
    # Documents why PromptTokenizer cleans text itself: CLIPTokenizerFast does not space CJK ideographs.
    fast = CLIPTokenizerFast.from_pretrained(sd1_json)
    prompt = ["你好世界"]
    fast_ids = fast(prompt, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert fast_ids != _reference(sd1[1], prompt).tolist()
    assert PromptTokenizer.from_folder(sd1_json).encode(prompt).tolist() == _reference(sd1[1], prompt).tolist()


def test_truncation_warns_with_dropped_words(sd1: tuple[Path, CLIPTokenizer]) -> None:
    tok = PromptTokenizer.from_folder(sd1[0])
    prompt = " ".join(["cat"] * 74 + ["purple", "elephant", "Über-Bäume!"])
    with pytest.warns(PromptTruncatedWarning) as record:
        ids = tok.encode(["short prompt", prompt])
    assert len(record) == 1
    message = str(record[0].message)
    head = prompt[:40] + "…"  # the prompt is named by its text, not by its row in the [e_∅; e_p] batch
    assert message.startswith(f"prompt {head!r} has 84 tokens") and "purple" not in message
    dropped = sd1[1](prompt)["input_ids"][1:-1][75:]
    assert message.endswith(f"dropped: {' '.join(sd1[1].decode(dropped).split())!r}")
    assert message.endswith("dropped: 'elephant über - bäume !'")  # CLIP ids mark word ends, not punctuation
    assert ids.tolist() == _reference(sd1[1], ["short prompt", prompt]).tolist()
    assert ids[1, -1] == tok.eos_id  # the end token survives truncation


def test_exactly_full_prompt_does_not_warn(sd1: tuple[Path, CLIPTokenizer]) -> None:
    tok = PromptTokenizer.from_folder(sd1[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = tok.encode([" ".join(["cat"] * 75)])
    assert ids[0, -1] == tok.eos_id and (ids[0, 1:-1] == 2368).all()


def test_pad_exclamation_variant(clip_files: Path, tmp_path: Path) -> None:
    """SD 2.x pads with "!" (id 0); "!" in a prompt is then a special token of its own, as in the slow tokenizer."""
    folder, slow = _slow_folder(clip_files, tmp_path / "sd2", pad_token="!")
    tok = PromptTokenizer.from_folder(folder)
    assert tok.pad_id == 0
    prompts = ["a cat", "hello!! world!", "!", ""]
    assert tok.encode(prompts).tolist() == _reference(slow, prompts).tolist()
    assert (tok.encode(["a cat"])[0, 4:] == 0).all()


def test_legacy_special_tokens_map_wins(sd1: tuple[Path, CLIPTokenizer], tmp_path: Path) -> None:
    """Hub SD 2.x folders: no added_tokens_decoder; special_tokens_map.json says pad "!", the config says eos."""
    folder = tmp_path / "legacy"
    shutil.copytree(sd1[0], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder")
    config["pad_token"] = "<|endoftext|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    token_map = json.loads((folder / "special_tokens_map.json").read_text())
    token_map["pad_token"] = "!"
    (folder / "special_tokens_map.json").write_text(json.dumps(token_map))
    slow = _without_ftfy(lambda: CLIPTokenizer.from_pretrained(folder))
    assert slow.pad_token == "!"
    tok = PromptTokenizer.from_folder(folder)
    assert tok.pad_id == 0
    assert tok.encode(["a dog!"]).tolist() == _reference(slow, ["a dog!"]).tolist()


def test_max_length_from_config_and_cap(sd1: tuple[Path, CLIPTokenizer], tmp_path: Path) -> None:
    folder = tmp_path / "short"
    shutil.copytree(sd1[0], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["model_max_length"] = 16
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = PromptTokenizer.from_folder(folder)
    assert tok.max_length == 16
    prompts = ["a photo of a cat", LONG]
    assert _encode_quiet(tok, prompts).tolist() == _reference(sd1[1], prompts, max_length=16).tolist()
    config["model_max_length"] = int(1e30)  # transformers' "no limit"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert PromptTokenizer.from_folder(folder).max_length == 77


def test_added_token_in_config(sd1: tuple[Path, CLIPTokenizer], tmp_path: Path) -> None:
    folder = tmp_path / "added"
    slow = _without_ftfy(lambda: CLIPTokenizer.from_pretrained(sd1[0]))
    slow.add_tokens(["<my-concept>"])
    slow.save_pretrained(folder)
    tok = PromptTokenizer.from_folder(folder)
    prompts = ["a photo of <my-concept> on a beach"]
    assert tok.encode(prompts).tolist() == _reference(slow, prompts).tolist()
    assert 49408 in tok.encode(prompts)[0]


ADDED_PROMPTS = [
    "a photo of <Cat-Toy> on a beach",
    "a photo of SKS dog, Sks and sks",  # only the exact case is the added token; the rest is lowercased text
    "<Cat-Toy>",
    "<Cat-Toy> at the start and at the end sks",
    "(<Cat-Toy>:1.2), [sks]!<Cat-Toy>.",
    "<Cat-Toy><Cat-Toy> sks sks sksdog dogsks",
    "<Cat-Toy>-v2 is longer than <Cat-Toy>-v and <cat-toy>-v2 is not added",
    "MyStyle mystyle MYSTYLE myStyle<|endoftext|>MyStyle",
    "猫sks猫 e\u0301sks\u200bsks <|ENDOFTEXT|>sks",
    "a  zz  b zz, zzz",  # zz strips the spaces around it
    "qq aqq qqb a qq b (qq)",  # single_word: qq counts only between spaces
    "ww a  ww b, aww  ww x\tww",  # lstrip + single_word: the tab makes ww rejoin the stripped "x"
]


@pytest.mark.parametrize("source", ["vocab_merges", "tokenizer_json", "tokenizer_json_only"])
def test_added_tokens_match_raw_text_like_slow(source: str, sd1: tuple[Path, CLIPTokenizer], tmp_path: Path) -> None:
    """Textual-inversion words: the slow tokenizer finds added tokens in the raw prompt (case-sensitive, longest
    first) and cleans, lowercases and BPE-encodes only the text between them."""
    slow = _without_ftfy(lambda: CLIPTokenizer.from_pretrained(sd1[0]))
    slow.add_tokens(["<Cat-Toy>", "sks", "<Cat-Toy>-v2", "MyStyle", AddedToken("zz", lstrip=True, rstrip=True),
                     AddedToken("qq", single_word=True), AddedToken("ww", lstrip=True, single_word=True)])
    folder = tmp_path / "added"
    slow.save_pretrained(folder)
    if source.startswith("tokenizer_json"):  # a fast tokenizer's folder, whose tokenizer.json lists them too
        CLIPTokenizerFast.from_pretrained(folder, from_slow=True).save_pretrained(tmp_path / "added_fast")
        folder = tmp_path / "added_fast"
        assert "<Cat-Toy>" in (folder / "tokenizer.json").read_text()
    if source == "tokenizer_json_only":  # as transformers < 4.34 saved it: no added_tokens_decoder in the config
        config = json.loads((folder / "tokenizer_config.json").read_text())
        del config["added_tokens_decoder"]
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        (folder / "added_tokens.json").unlink(missing_ok=True)
    tok = PromptTokenizer.from_folder(folder)
    ours, ref = tok.encode(ADDED_PROMPTS), _reference(slow, ADDED_PROMPTS)
    for prompt, a, b in zip(ADDED_PROMPTS, ours.tolist(), ref.tolist(), strict=True):
        assert a == b, f"mismatch for {prompt!r}"
    assert ours[0, 4] == slow.convert_tokens_to_ids("<Cat-Toy>") == 49408
    assert ours[1].tolist().count(slow.convert_tokens_to_ids("sks")) == 1  # "SKS" and "Sks" are plain text
    ids = tok.tokenize(ADDED_PROMPTS[0])
    assert tok.decode(ids) == " ".join(slow.decode(ids).split()) == ADDED_PROMPTS[0]


def test_plain_prompts_also_match_the_ftfy_variant(sd1: tuple[Path, CLIPTokenizer]) -> None:
    """Where ftfy has nothing to fix (ASCII, no CJK), both slow variants and PromptTokenizer agree."""
    pytest.importorskip("ftfy")
    with_ftfy = CLIPTokenizer.from_pretrained(sd1[0])
    assert with_ftfy.fix_text is not None
    prompts = PROMPTS[:8] + [LONG]
    ours = _encode_quiet(PromptTokenizer.from_folder(sd1[0]), prompts)
    assert ours.tolist() == _reference(with_ftfy, prompts).tolist()


def _copy_without(src: Path, dest: Path, *names: str) -> Path:
    shutil.copytree(src, dest)
    for name in names:
        (dest / name).unlink()
    return dest


def test_missing_files_are_named(sd1: tuple[Path, CLIPTokenizer], tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="tokenizer folder not found"):
        PromptTokenizer.from_folder(tmp_path / "nowhere")
    folder = _copy_without(sd1[0], tmp_path / "no_merges", "merges.txt")
    with pytest.raises(ModelFolderError, match=r"neither tokenizer\.json nor vocab\.json \+ merges\.txt"):
        PromptTokenizer.from_folder(folder)


def test_corrupt_files_are_named(sd1: tuple[Path, CLIPTokenizer], sd1_json: Path, tmp_path: Path) -> None:
    folder = _copy_without(sd1[0], tmp_path / "bad_vocab")
    (folder / "vocab.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match=r"corrupt JSON in .*vocab\.json"):
        PromptTokenizer.from_folder(folder)

    folder = _copy_without(sd1[0], tmp_path / "bad_merges")
    (folder / "merges.txt").write_text("#version: 0.2\na b\nthree symbols here\n")
    with pytest.raises(ModelFolderError, match=r"merges\.txt: line 3"):
        PromptTokenizer.from_folder(folder)

    folder = _copy_without(sd1[0], tmp_path / "bad_config")
    (folder / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ModelFolderError, match=r"tokenizer_config\.json"):
        PromptTokenizer.from_folder(folder)

    folder = tmp_path / "bad_json"
    shutil.copytree(sd1_json, folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(ModelFolderError, match=r"corrupt .*tokenizer\.json"):
        PromptTokenizer.from_folder(folder)


def test_unknown_special_token_is_named(sd1: tuple[Path, CLIPTokenizer], tmp_path: Path) -> None:
    folder = _copy_without(sd1[0], tmp_path / "odd_bos")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder")
    config["bos_token"] = "<|nope|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").unlink()
    with pytest.raises(ModelFolderError, match=r"bos_token '<\|nope\|>' is not in the vocabulary"):
        PromptTokenizer.from_folder(folder)


def test_runtime_module_does_not_import_transformers() -> None:
    code = ("import sys, basinguard.runtime.tokenizer; "
            "print(sorted(m for m in ('transformers', 'torch', 'diffusers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_truncation_warnings_do_not_accumulate(sd1: tuple[Path, CLIPTokenizer]) -> None:
    """warnings.warn keeps every distinct message in its caller's registry for good: a service that cuts many
    distinct prompts would grow without bound. Each text is still shown once."""
    from basinguard.runtime import tokenizer as tokenizer_module

    tok = PromptTokenizer.from_folder(sd1[0])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")
        texts = [f"prompt {k} " + "cat " * 80 for k in range(1500)]
        for text in [*texts, texts[-1]]:  # the last text twice, from the same line: shown once
            tok.encode([text])
    assert len(record) == 1500 and all(r.category is PromptTruncatedWarning for r in record)
    assert len(tokenizer_module._TRUNCATIONS_SHOWN) <= 1025
    assert len(globals().get("__warningregistry__", {})) < 10  # the caller's registry holds none of them
