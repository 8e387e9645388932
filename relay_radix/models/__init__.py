"""Built-in offline models: Llama shapes served with random weights (``--load-format dummy``).

| name | shape | heads (q / KV) | MLP | vocab |
|---|---|---|---|---|
| ``llama2-7b-mha`` | Llama-2-7B | 32 / 32 (MHA) | 11008 | 32000 |
| ``llama3-8b-gqa`` | Llama-3-8B, rope theta 5e5 | 32 / 8 (GQA-4) | 14336 | 128256 |

Only ``config.json`` ships with the package. :func:`materialize` writes the rest of a model
folder (tokenizer files) into a cache directory, because the tokenizer of the 128K vocabulary
is several MB. The tokenizer is word-level over one word per id: the special tokens, then
common English words and punctuation, then made-up consonant-vowel words. Hence every id a
random-weight model samples decodes to a visible word, text decoded from ids re-encodes to
the same ids, and benchmark prompts made of random ids have exactly the requested length.
English comes first so that English text (chat-template roles, frontend programs) maps to
real, distinct ids.

Names are accepted bare (``llama2-7b-mha``) or with the ``relay-radix/`` prefix.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

PREFIX = "relay-radix/"
_HERE = Path(__file__).resolve().parent

BUILTIN_MODELS = {
    "llama2-7b-mha": "Llama-2-7B shape: 32 layers, hidden 4096, 32 q / 32 KV heads, MLP 11008, vocab 32000",
    "llama3-8b-gqa": "Llama-3-8B shape: 32 layers, hidden 4096, 32 q / 8 KV heads, MLP 14336, vocab 128256, rope theta 5e5",
}

SPECIALS = ["<s>", "</s>", "<unk>"]  # ids 0, 1, 2 (config: bos 0, eos 1)
ENGLISH = list(".,:;!?'\"()[]{}-_/#*=+<>|@$%&0123456789") + (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which she "
    "do how their if will up other about out many then them these so some her would make like "
    "him into time has look two more write go see number no way could people my than first "
    "water been call who oil its now find long down day did get come made may part system "
    "prompt assistant user answer question document policy rule example reason step tool "
    "function return value model request server cache token role content a i me please "
    "explain why yes thanks hello world help").split()

# Bump when the generated files change, so that cached folders are rebuilt.
_GENERATOR_VERSION = "1"
_STAMP = ".relay_radix_model.json"

_TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
    "unk_token": "<unk>", "model_max_length": 32768, "add_bos_token": True,
    "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:",
}


def canonical_name(arg: str) -> str | None:
    """``relay-radix/llama2-7b-mha`` or ``llama2-7b-mha`` -> ``llama2-7b-mha``; None if not built in."""
    name = arg[len(PREFIX):] if arg.startswith(PREFIX) else arg
    return name if name in BUILTIN_MODELS else None


def load_config(name: str) -> dict:
    """The packaged config.json of a built-in model."""
    canon = canonical_name(name)
    if canon is None:
        raise KeyError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN_MODELS)}")
    return json.loads((_HERE / canon / "config.json").read_text())


def _made_up_words(n: int, taken: set[str]) -> list[str]:
    """n distinct pronounceable words not in ``taken``: consonant-vowel syllables, shortest first."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]  # 70
    out: list[str] = []
    if n <= 0:
        return out
    for k in itertools.count(1):
        for parts in itertools.product(syllables, repeat=k):
            word = "".join(parts)
            if word not in taken:
                out.append(word)
                if len(out) == n:
                    return out


@lru_cache(maxsize=4)
def _vocab_cached(vocab_size: int) -> tuple[str, ...]:
    known = list(dict.fromkeys(SPECIALS + ENGLISH))
    return tuple(known + _made_up_words(vocab_size - len(known), set(known)))


def vocab_words(name: str) -> list[str]:
    """The tokenizer's words in id order (``vocab_words(m)[i]`` is token id i)."""
    return list(_vocab_cached(load_config(name)["vocab_size"]))


def prompt_words(name: str) -> list[str]:
    """Words that are safe to build prompts from: every non-special word (one token each)."""
    return list(_vocab_cached(load_config(name)["vocab_size"])[len(SPECIALS):])


def default_cache_dir() -> Path:
    env = os.environ.get("RELAY_RADIX_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "relay_radix" / "models"


def _stamp(name: str) -> dict:
    cfg_bytes = (_HERE / name / "config.json").read_bytes()
    return {"name": name, "generator": _GENERATOR_VERSION,
            "config_sha256": hashlib.sha256(cfg_bytes).hexdigest()}


def _is_current(folder: Path, stamp: dict) -> bool:
    try:
        return json.loads((folder / _STAMP).read_text()) == stamp
    except (OSError, ValueError):
        return False


def _write_model_folder(name: str, folder: Path) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    words = vocab_words(name)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(folder / "tokenizer.json"))
    cfg = load_config(name)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(_TOKENIZER_CONFIG, indent=1) + "\n")
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials) + "\n")
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
    (folder / "generation_config.json").write_text(json.dumps(gen) + "\n")


def materialize(name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Write the model folder of a built-in model (config + tokenizer files); return its path.

    The folder is ``<cache_dir>/<name>`` with ``cache_dir`` defaulting to
    ``$RELAY_RADIX_MODEL_CACHE`` or ``~/.cache/relay_radix/models``. Idempotent: a folder whose
    stamp matches the packaged config and generator version is returned as is. The folder is
    built beside its final place and renamed into it, so concurrent callers (the benchmark
    driver and the server launcher) never see a half-written folder.
    """
    canon = canonical_name(name)
    if canon is None:
        raise KeyError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN_MODELS)}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / canon
    stamp = _stamp(canon)
    if _is_current(folder, stamp):
        return str(folder)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{canon}.", dir=root))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        _write_model_folder(canon, tmp)
        (tmp / _STAMP).write_text(json.dumps(stamp) + "\n")  # last: marks the folder complete
        if folder.exists():
            if _is_current(folder, stamp):  # another process won the race
                return str(folder)
            shutil.rmtree(folder, ignore_errors=True)  # stale generator version
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _is_current(folder, stamp):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def resolve_model_path(arg: str, cache_dir: str | os.PathLike | None = None) -> str | None:
    """Materialized folder for a built-in model name (``relay-radix/llama2-7b-mha``), else None.

    A bare name (``llama2-7b-mha``) is accepted too unless a local path of that name exists,
    which then wins (SGLang would load it).
    """
    canon = canonical_name(arg)
    if canon is None:
        return None
    if not arg.startswith(PREFIX) and os.path.exists(arg):
        return None
    return materialize(canon, cache_dir)
