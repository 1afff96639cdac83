"""Tokenizers: HF `tokenizer.json` through the `tokenizers` library, and a byte-level
fallback for the tiny presets (ids 0-255 are bytes, 256 = BOS, 257 = EOS)."""

from __future__ import annotations

import json
from pathlib import Path


class ByteTokenizer:
    bos_token_id = 256
    eos_token_id = 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """tokenizer.json as shipped with a model; special tokens added as the model expects
    (e.g. [CLS] ... [SEP] for BERT), no padding, no truncation (the engine checks lengths)."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.no_truncation()
        # The chat template (Jinja) and the special tokens it refers to, from the
        # tokenizer_config.json beside tokenizer.json; None/empty where there is none.
        self.chat_template, self.special_tokens = _chat_config(
            Path(path).parent / "tokenizer_config.json"
        )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def _chat_config(path: Path) -> tuple[str | None, dict[str, str]]:
    """(chat template, {"bos_token": ..., "eos_token": ...}) from a tokenizer_config.json."""
    if not path.is_file():
        return None, {}
    config = json.loads(path.read_text())
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    tokens = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        v = config.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str):
            tokens[key] = v
    return (template if isinstance(template, str) else None), tokens


def load_tokenizer(model_dir: str | Path) -> HFTokenizer | None:
    path = Path(model_dir) / "tokenizer.json"
    return HFTokenizer(path) if path.is_file() else None


def token_ids(inputs: list, tokenizer, model_name: str) -> list[list[int]]:
    """Offline inputs as token-id lists: text is encoded, id lists are taken as they are."""
    ids = []
    for x in inputs:
        if isinstance(x, str):
            if tokenizer is None:
                raise ValueError(f"model {model_name!r} has no tokenizer: give token ids")
            x = tokenizer.encode(x)
        ids.append(list(x))
    return ids
