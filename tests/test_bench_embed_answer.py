"""Reading an embeddings answer's shape without parsing its numbers: both encodings, compact
and spaced JSON, and every way an answer can be wrong."""

import base64
import json

import numpy as np
import pytest

from coserve.bench.embed_answer import BadAnswer, embedding_shape


def _answer(vectors, encoding, compact=True):
    def enc(v):
        if encoding == "base64":
            return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()
        return [float(x) for x in v]

    obj = {
        "object": "list",
        "model": "m",
        "data": [
            {"object": "embedding", "index": i, "embedding": enc(v)} for i, v in enumerate(vectors)
        ],
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }
    seps = (",", ":") if compact else (", ", ": ")
    return json.dumps(obj, separators=seps).encode()


@pytest.mark.parametrize("encoding", ["float", "base64"])
@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("n, dim", [(1, 1), (3, 7), (8, 384)])
def test_shape_of_a_good_answer(encoding, compact, n, dim):
    rng = np.random.default_rng(n * dim)
    body = _answer(rng.standard_normal((n, dim)), encoding, compact)
    assert embedding_shape(body) == (n, dim, encoding)


def test_base64_with_escaped_slashes_is_read_through_json():
    # JSON may write "/" as "\/"; the bytes then are not base64 as they stand
    v = np.frombuffer(b"\xff\xff\xff\x3f" * 6, dtype="<f4")  # encodes with "/" in it
    body = _answer([v, v], "base64")
    assert b"/" in body
    assert embedding_shape(body.replace(b"/", b"\\/")) == (2, 6, "base64")


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("answered", ["float", "base64"])
def test_either_encoding_is_read_and_named_whatever_was_asked(answered, compact):
    body = _answer([[0.5, 0.25], [1.0, 2.0]], answered, compact)
    assert embedding_shape(body) == (2, 2, answered)


def test_both_encodings_in_one_answer_are_refused():
    a = json.loads(_answer([[0.5, 0.25]], "float"))
    b = json.loads(_answer([[0.5, 0.25]], "base64"))
    a["data"].append(b["data"][0])
    with pytest.raises(BadAnswer, match="both encodings"):
        embedding_shape(json.dumps(a).encode())


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_vectors_of_different_dimensions_are_refused(encoding):
    with pytest.raises(BadAnswer, match="different dimensions"):
        embedding_shape(_answer([[1.0, 2.0, 3.0], [1.0, 2.0]], encoding))


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_empty_vectors_are_refused(encoding):
    with pytest.raises(BadAnswer, match="empty"):
        embedding_shape(_answer([[], []], encoding))


def test_base64_that_is_not_whole_float32s_is_refused():
    body = b'{"data":[{"embedding":"' + base64.b64encode(b"123456") + b'"}]}'
    with pytest.raises(BadAnswer, match="6 bytes"):
        embedding_shape(body)


def test_base64_that_does_not_decode_is_refused():
    with pytest.raises(BadAnswer, match="base64"):
        embedding_shape(b'{"data":[{"embedding":"AAA*AAAA"}]}')


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b'{"data":[]}',
        b'{"object":"list"}',
        b'{"data":[{"index":0}]}',
        b'{"data":[{"embedding":3}]}',
    ],
)
def test_what_is_not_an_answer_is_refused(body):
    with pytest.raises(BadAnswer):
        embedding_shape(body)
