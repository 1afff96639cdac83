"""The shape of a /v1/embeddings answer (how many vectors, of what dimension), read without
turning its numbers into Python floats.

A float answer's dimension is the number of commas in each vector's list, plus one; a base64
answer (little-endian float32s, as the openai client asks for by default) is decoded, and its
dimension is the decoded length / 4. Both are byte operations in C: a Qwen3-Embedding-8B
answer of 8 x 4096 values costs tens of microseconds, where `json.loads` of the float form
costs milliseconds. Compact JSON (what vLLM, SGLang and `coserve serve` write) takes that
path; anything else is parsed with `json` and checked the same way.
"""

from __future__ import annotations

import binascii
import json

__all__ = ["ENCODINGS", "BadAnswer", "embedding_shape"]

ENCODINGS = ("float", "base64")

_KEY = b'"embedding":'


class BadAnswer(ValueError):
    """The answer is not a list of equal, non-empty vectors in the encoding asked for."""


def embedding_shape(body: bytes, encoding: str) -> tuple[int, int]:
    """(number of vectors, their dimension) of the answer `body` to a request that asked for
    `encoding`; raises BadAnswer when it cannot be read so."""
    dims = []
    i = body.find(_KEY)
    while i >= 0:
        j = i + len(_KEY)
        opener = body[j:j + 1]
        if opener == b'"':
            k = body.find(b'"', j + 1)
            if k < 0 or encoding != "base64":
                break
            try:
                raw = binascii.a2b_base64(body[j + 1:k], strict_mode=True)
            except binascii.Error:
                break  # an escaped "/" (JSON allows "\/") or a bad string: json will say
            dims.append(_float32_count(len(raw)))
        elif opener == b"[":
            k = body.find(b"]", j)
            if k < 0 or encoding != "float":
                break
            seg = body[j + 1:k]
            dims.append(seg.count(b",") + 1 if seg.strip() else 0)
        else:
            break
        i = body.find(_KEY, k)
    else:
        if dims:
            return len(dims), _one_dim(dims)
    return _parsed_shape(body, encoding)


def _parsed_shape(body: bytes, encoding: str) -> tuple[int, int]:
    try:
        data = json.loads(body)["data"]
        vectors = [d["embedding"] for d in data]
    except (ValueError, KeyError, TypeError) as e:
        raise BadAnswer(f"not an embeddings answer ({e.__class__.__name__}: {e})") from None
    if not vectors:
        raise BadAnswer("no embedding in the answer")
    dims = []
    for v in vectors:
        if encoding == "base64" and isinstance(v, str):
            try:
                raw = binascii.a2b_base64(v, strict_mode=True)
            except binascii.Error as e:
                raise BadAnswer(f"an embedding is not valid base64: {e}") from None
            dims.append(_float32_count(len(raw)))
        elif encoding == "float" and isinstance(v, list):
            dims.append(len(v))
        elif isinstance(v, (str, list)):
            got = "a base64 string" if isinstance(v, str) else "a list of floats"
            raise BadAnswer(f"asked for encoding_format {encoding!r}, an embedding came as "
                            f"{got}; pass --embed-encoding to match the server")
        else:
            raise BadAnswer(f"an embedding is a {type(v).__name__}")
    return len(dims), _one_dim(dims)


def _float32_count(nbytes: int) -> int:
    if nbytes % 4:
        raise BadAnswer(f"a base64 embedding decodes to {nbytes} bytes, not whole float32s")
    return nbytes // 4


def _one_dim(dims: list[int]) -> int:
    lo, hi = min(dims), max(dims)
    if lo != hi:
        raise BadAnswer(f"embeddings of different dimensions in one answer ({lo} to {hi})")
    if lo == 0:
        raise BadAnswer("empty embeddings in the answer")
    return lo
