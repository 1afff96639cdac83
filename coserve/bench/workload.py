"""Seeded request bodies. Request i of an endpoint always gets the same input for the same
seed (whichever worker sends it), so a run's inputs can be rebuilt from (seed, i).

A chat request's one user message is the same prompt's token ids written as words (id k is
the (k mod 196)-th of 196 common words), so completions and chat runs draw the same workload."""

from __future__ import annotations

import json
import random

from coserve.bench.config import LoadConfig

# Common short English words, nearly all one token in BPE and WordPiece vocabularies.
_WORDS = (
    "the of and to in is it you that he was for on are with as his they be at one have this "
    "from or had by word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like "
    "so these her long make thing see him two has look more day could go come did number "
    "sound no most people my over know water than call first who may down side been now "
    "find any new work part take get place made live where after back little only round man "
    "year came show every good me give our under name very through just form sentence great "
    "think say help low line differ turn cause much mean before move right boy old too same "
    "tell does set three want air well also play small end put home read hand port large "
    "spell add even land here must big high such follow act why ask men change went light "
    "kind off need house picture try us again animal point mother world near build self earth"
).split()

_GEN, _EMBED = 1, 2


def _rng(seed: int, stream: int, i: int) -> random.Random:
    # A string seed is hashed (SHA-512) the same way on every platform and Python 3 version,
    # and Random.choices is stable too; this costs a few microseconds, not numpy's ~50.
    return random.Random(f"coserve-bench:{seed}:{stream}:{i}")


class Workload:
    def __init__(self, cfg: LoadConfig):
        self.cfg = cfg
        self._ids = range(cfg.token_id_low, cfg.token_id_high)
        self._gen_parts: dict[str, tuple[bytes, bytes]] = {}

    def gen_prompt(self, i: int) -> list[int]:
        return _rng(self.cfg.seed, _GEN, i).choices(self._ids, k=self.cfg.input_len)

    def chat_text(self, i: int) -> str:
        return " ".join(_WORDS[t % len(_WORDS)] for t in self.gen_prompt(i))

    def embed_input(self, i: int) -> list[list[int]] | list[str]:
        c = self.cfg
        rng = _rng(c.seed, _EMBED, i)
        if c.embed_text:
            return [
                " ".join(rng.choices(_WORDS, k=c.embed_input_len)) for _ in range(c.embed_batch)
            ]
        return [rng.choices(self._ids, k=c.embed_input_len) for _ in range(c.embed_batch)]

    def gen_body(self, model: str, i: int) -> bytes:
        """The JSON body of gen request i: /v1/completions's, or /v1/chat/completions's when
        the config's gen_endpoint is "chat"."""
        if self.cfg.gen_endpoint == "chat":
            return self._chat_body(model, i)
        parts = self._gen_parts.get(model)
        if parts is None:  # the JSON around the prompt, built once per model name
            c = self.cfg
            head, tail = json.dumps(
                {
                    "model": model,
                    "prompt": [0],
                    "max_tokens": c.output_len,
                    "temperature": c.temperature,
                    "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
                separators=(",", ":"),
            ).split('"prompt":[0]')
            parts = self._gen_parts[model] = ((head + '"prompt":[').encode(), ("]" + tail).encode())
        return parts[0] + ",".join(map(str, self.gen_prompt(i))).encode() + parts[1]

    def _chat_body(self, model: str, i: int) -> bytes:
        c = self.cfg
        return json.dumps(
            {
                "model": model,
                "messages": [{"role": "user", "content": self.chat_text(i)}],
                "max_completion_tokens": c.output_len,
                "temperature": c.temperature,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            separators=(",", ":"),
        ).encode()

    def embed_body(self, model: str, i: int) -> bytes:
        return json.dumps(
            {
                "model": model,
                "input": self.embed_input(i),
                "encoding_format": self.cfg.embed_encoding,
            },
            separators=(",", ":"),
        ).encode()
