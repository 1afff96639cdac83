"""The shape of a /v1/embeddings answer (how many vectors, of what dimension), read without
turning its numbers into Python floats.

An answer in the other encoding than the one asked (floats where base64 was asked, as some
servers and proxies answer) is still an answer: its shape is read the same way and the
encoding it came in is returned beside it.

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
    """The answer is not a list of equal, non-empty vectors in one encoding."""


def embedding_shape(body: bytes) -> tuple[int, int, str]:
    """(number of vectors, their dimension, the encoding they came in: "float" | "base64")
    of the answer `body`; raises BadAnswer when it cannot be read so."""
    dims = []
    seen = set()
    i = body.find(_KEY)
    while i >= 0:
        j = i + len(_KEY)
        opener = body[j : j + 1]
        if opener == b'"':
            k = body.find(b'"', j + 1)
            if k < 0:
                break
            try:
                raw = binascii.a2b_base64(body[j + 1 : k], strict_mode=True)
            except binascii.Error:
                break  # an escaped "/" (JSON allows "\/") or a bad string: json will say
            dims.append(_float32_count(len(raw)))
            seen.add("base64")
        elif opener == b"[":
            k = body.find(b"]", j)
            if k < 0:
                break
            seg = body[j + 1 : k]
            dims.append(seg.count(b",") + 1 if seg.strip() else 0)
            seen.add("float")
        else:
            break
        i = body.find(_KEY, k)
    else:
        if dims and len(seen) == 1:
            return len(dims), _one_dim(dims), seen.pop()
    return _parsed_shape(body)


def _parsed_shape(body: bytes) -> tuple[int, int, str]:
    try:
        data = json.loads(body)["data"]
        vectors = [d["embedding"] for d in data]
    except (ValueError, KeyError, TypeError) as e:
        raise BadAnswer(f"not an embeddings answer ({e.__class__.__name__}: {e})") from None
    if not vectors:
        raise BadAnswer("no embedding in the answer")
    dims = []
    seen = set()
    for v in vectors:
        if isinstance(v, str):
            try:
                raw = binascii.a2b_base64(v, strict_mode=True)
            except binascii.Error as e:
                raise BadAnswer(f"an embedding is not valid base64: {e}") from None
            dims.append(_float32_count(len(raw)))
            seen.add("base64")
        elif isinstance(v, list):
            dims.append(len(v))
            seen.add("float")
        else:
            raise BadAnswer(f"an embedding is a {type(v).__name__}")
    if len(seen) > 1:
        raise BadAnswer(
            "embeddings in both encodings (base64 strings and float lists) in one answer"
        )
    return len(dims), _one_dim(dims), seen.pop()


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
