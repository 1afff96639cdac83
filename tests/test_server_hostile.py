"""Hostile input to both built-in servers, sent raw (aiohttp, and a socket for bytes no HTTP
client sends): every bad body gets a 4xx with an OpenAI error body, never a 5xx, errors quote
at most a cut piece of the value, the per-request limits hold before any work, and a good
request still works afterwards."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import urllib.parse

import aiohttp
import pytest
from test_server_util import ROOT, coserve_serve

KEY = "sesame"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_LEN = 256
DEEP = 100_000


@pytest.fixture(scope="module")
def gen():
    with coserve_serve(
        "gen",
        "--model",
        "tiny-dense",
        "--random-weights",
        "--device",
        "cpu",
        "--max-model-len",
        str(MAX_LEN),
        "--max-num-seqs",
        "4",
        "--kv-cache-bytes",
        "16M",
        "--api-key",
        KEY,
        "--max-gen-choices",
        "8",
        "--max-request-bytes",
        "1M",
    ) as s:
        yield s


@pytest.fixture(scope="module")
def embed():
    with coserve_serve(
        "embed",
        "--model",
        "tiny-embed",
        "--random-weights",
        "--device",
        "cpu",
        "--max-embed-inputs",
        "16",
    ) as s:
        yield s


def send(url: str, path: str, body, headers: dict | None = None) -> tuple[int, dict | str]:
    """POST `body` (bytes/str as is, anything else as JSON) with aiohttp; (status, answer)."""

    async def go():
        data = body if isinstance(body, bytes | str) else json.dumps(body)
        hdrs = {"Content-Type": "application/json", **AUTH, **(headers or {})}
        async with (
            aiohttp.ClientSession() as session,
            session.post(url + path, data=data, headers=hdrs) as resp,
        ):
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text

    return asyncio.run(go())


def raw(url: str, head: bytes, body: bytes = b"") -> tuple[int, dict]:
    """One HTTP/1.1 request written byte for byte (for headers no client library sends)."""
    u = urllib.parse.urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
        sock.sendall(
            head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1])


def assert_openai_error(status: int, answer, statuses=range(400, 500)) -> dict:
    assert status in statuses, (status, str(answer)[:500])
    err = answer["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert len(err["message"]) < 600, err["message"][:600]  # a cut quote, never the whole value
    return err


GEN_BAD = [
    ("deep array", "[" * DEEP),
    ("deep object", '{"prompt":' + '{"a":' * DEEP),
    ("deep prompt list", '{"prompt":' + "[" * 900 + "1" + "]" * 900 + "}"),
    ("lone surrogate text", '{"prompt": "a\\ud800b"}'),
    ("lone surrogate stop", '{"prompt": [1], "stop": ["\\udc00"]}'),
    ("lone surrogate model", '{"prompt": [1], "model": "\\ud800"}'),
    ("invalid utf-8", b'{"prompt": "\xff\xfe"}'),
    ("empty body", b""),
    ("NaN temperature", '{"prompt": [1], "temperature": NaN}'),
    ("inf top_p", '{"prompt": [1], "top_p": Infinity}'),
    ("huge seed", {"prompt": [1], "seed": 2**64}),
    ("huge max_tokens", {"prompt": [1], "max_tokens": 10**30}),
    ("huge n", {"prompt": [1], "n": 10**20}),
    ("huge top_k", {"prompt": [1], "top_k": 10**4000}),
    ("huge logprobs", {"prompt": [1], "logprobs": 10**30}),
    ("huge token id", {"prompt": [1, 10**30]}),
    ("too many prompts", {"prompt": [[1]] * 9}),
    ("too many choices", {"prompt": [[1]] * 3, "n": 3}),
    ("long text prompt", {"prompt": "x" * (16 * MAX_LEN + 1)}),
    ("over-long stop list", {"prompt": [1], "stop": ["ab"] * 10**5}),
    ("stop not strings", {"prompt": [1], "stop": [1, 2]}),
    ("prompt an object", {"prompt": {"a": 1}}),
    ("body a string", '"hello"'),
    ("body null", "null"),
    ("body too large", '{"prompt": "' + "x" * (2 << 20) + '"}'),
]
CHAT_BAD = [
    ("no messages", {"max_tokens": 2}),
    ("messages an object", {"messages": {"role": "user"}}),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}),
    (
        "image part",
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        },
    ),
    ("lone surrogate content", '{"messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("deep content", '{"messages": [{"role": "user", "content": ' + "[" * 900 + "]" * 900 + "}]}"),
    (
        "top_logprobs without logprobs",
        {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
    ),
    ("tools", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}),
    ("NaN temperature", '{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
    (
        "max_completion_tokens over context",
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": MAX_LEN},
    ),
]
EMBED_BAD = [
    ("deep array", "[" * DEEP),
    ("lone surrogate", '{"input": "\\ud800"}'),
    ("lone surrogate in list", '{"input": ["ok", "\\udfff"]}'),
    ("too many inputs", {"input": ["a"] * 17}),
    ("too many id lists", {"input": [[1]] * 17}),
    ("long text", {"input": "y" * (16 * 512 + 1)}),
    ("bad format", {"input": "a", "encoding_format": "z" * 10**6}),
    ("huge dimensions", {"input": "a", "dimensions": 10**30}),
]


def _fuzz(url: str, path: str, cases: list, good: dict) -> None:
    for what, body in cases:
        status, answer = send(url, path, body)
        assert status < 500, (what, status, str(answer)[:300])
        assert_openai_error(status, answer)
    status, answer = send(url, path, good)
    assert status == 200, answer


def test_gen_bad_bodies_get_4xx_and_the_server_keeps_serving(gen):
    _fuzz(gen.url, "/v1/completions", GEN_BAD, {"prompt": "still here", "max_tokens": 2})


def test_chat_bad_bodies_get_4xx(gen):
    _fuzz(
        gen.url,
        "/v1/chat/completions",
        CHAT_BAD + GEN_BAD[:10],
        {"messages": [{"role": "user", "content": "still here"}], "max_tokens": 2},
    )


def test_embed_bad_bodies_get_4xx_and_the_server_keeps_serving(embed):
    _fuzz(embed.url, "/v1/embeddings", EMBED_BAD, {"input": ["still", "here"]})


def test_specific_answers(gen, embed):
    err = assert_openai_error(
        *send(gen.url, "/v1/completions", '{"prompt": [1], "temperature": NaN}')
    )
    assert err["param"] == "temperature" and "must be a finite number" in err["message"]
    err = assert_openai_error(*send(gen.url, "/v1/completions", {"prompt": [1], "seed": 2**64}))
    assert err["param"] == "seed"
    err = assert_openai_error(*send(gen.url, "/v1/completions", "[" * DEEP))
    assert "too deeply" in err["message"]
    err = assert_openai_error(
        *send(gen.url, "/v1/completions", {"prompt": "x", "stop": ["ab"] * 10**5})
    )
    assert err["param"] == "stop"
    status, answer = send(gen.url, "/v1/completions", '{"prompt": "' + "x" * (2 << 20) + '"}')
    assert status == 413 and "1048576" in answer["error"]["message"]
    status, answer = send(embed.url, "/v1/embeddings", {"input": ["a"] * 17})
    assert (
        status == 400 and answer["error"]["param"] == "input" and "16" in answer["error"]["message"]
    )
    for url, path, body in (
        (gen.url, "/v1/completions", {"prompt": [1]}),
        (gen.url, "/v1/chat/completions", {"messages": []}),
        (embed.url, "/v1/embeddings", {"input": "a"}),
    ):
        status, answer = send(url, path, {**body, "model": "no-such"})
        assert (
            status == 404
            and answer["error"]["type"] == "NotFoundError"
            and answer["error"]["code"] == 404
        )


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None]
)
def test_posts_without_json_content_type_get_415(gen, embed, content_type):
    for url, path, body in (
        (gen.url, "/v1/completions", {"prompt": [1], "max_tokens": 1}),
        (embed.url, "/v1/embeddings", {"input": "a"}),
    ):
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n".encode()
        if content_type is not None:
            head += f"Content-Type: {content_type}\r\n".encode()
        status, answer = raw(url, head, json.dumps(body).encode())
        assert_openai_error(status, answer, [415])


def test_non_ascii_authorization_header_is_401(gen):
    for value in ("Bearer s\u00e9same".encode(), b"Bearer \xff\xfe\xfd", "Bearer 鍵".encode()):
        head = (
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nAuthorization: "
        )
        status, answer = raw(gen.url, head + value + b"\r\n", b'{"prompt": [1], "max_tokens": 1}')
        assert_openai_error(status, answer, [401])
    assert send(gen.url, "/v1/completions", {"prompt": [1], "max_tokens": 1})[0] == 200


def test_serve_embed_refuses_enforce_eager():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "coserve",
            "serve",
            "embed",
            "--model",
            "tiny-embed",
            "--random-weights",
            "--device",
            "cpu",
            "--enforce-eager",
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert (
        proc.returncode == 2 and "--enforce-eager" in proc.stderr and "embed engine" in proc.stderr
    )


def test_every_serve_flag_has_help():
    from coserve.server import command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    missing = [a.dest for a in parser._actions if not a.help]
    assert missing == []
    text = parser.format_help()
    for flag in (
        "--host",
        "--log-level",
        "--max-embed-inputs",
        "--max-gen-choices",
        "--max-request-bytes",
        "--max-prompt-chars",
    ):
        assert flag in text


def test_out_of_vocabulary_token_ids_name_their_field(gen, embed):
    err = assert_openai_error(*send(gen.url, "/v1/completions", {"prompt": [10**12]}))
    assert err["param"] == "prompt" and "out of vocabulary" in err["message"]
    err = assert_openai_error(*send(embed.url, "/v1/embeddings", {"input": [10**9]}))
    assert err["param"] == "input" and "out of vocabulary" in err["message"]


def test_a_malformed_content_length_gets_an_openai_body_and_no_traceback(embed):
    u = urllib.parse.urlsplit(embed.url)
    head = (
        "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Length: -5\r\nConnection: close\r\n\r\n{{}}"
    )
    with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
        sock.sendall(head.encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    err = assert_openai_error(status, json.loads(data.split(b"\r\n\r\n", 1)[1]), [400])
    assert "Content-Length" in err["message"]
    assert "Traceback" not in embed.log_tail(200)


def test_a_content_type_aiohttp_cannot_parse_is_quoted_as_sent(embed):
    head = f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    status, answer = raw(embed.url, (head + "Content-Type: ;;;===\r\n").encode(), b"{}")
    err = assert_openai_error(status, answer, [415])
    assert "got ';;;==='" in err["message"] and "octet-stream" not in err["message"]


@pytest.mark.parametrize("role", ["gen", "embed"])
def test_a_body_that_is_not_in_its_content_encoding_is_a_400(gen, embed, role):
    """`Content-Encoding: gzip` on a plain JSON body was a 500 ("internal error:
    RequestPayloadError ... Can not decode content-encoding: gzip") with a traceback."""
    server = {"gen": gen, "embed": embed}[role]
    path = "/v1/completions" if role == "gen" else "/v1/embeddings"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: application/json\r\nContent-Encoding: gzip\r\n"
    )
    status, answer = raw(server.url, head.encode(), b'{"model": "m", "input": "hi"}')
    err = assert_openai_error(status, answer, [400])
    assert "could not be read" in err["message"] and "gzip" in err["message"]
    assert "Traceback" not in server.log_tail(200)


def test_a_content_encoding_the_server_does_not_decode_is_a_415(embed):
    """`Content-Encoding: xyz` reached the handler undecoded and was answered 200 as if the
    body were plain JSON."""
    head = (
        f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: application/json\r\nContent-Encoding: xyz\r\n"
    )
    status, answer = raw(embed.url, head.encode(), b'{"model": "m", "input": "hi"}')
    err = assert_openai_error(status, answer, [415])
    assert "'xyz'" in err["message"] and "gzip" in err["message"]
    ok = head.replace("xyz", "identity")
    status, _ = raw(embed.url, ok.encode(), b'{"input": "hi"}')
    assert status != 415


def test_a_wrong_method_is_counted_as_a_bad_request_not_a_server_error(embed):
    """A GET to /v1/embeddings (405) was counted in /metrics as outcome "error", beside the
    server's own 500s."""
    from test_server_util import metric, request

    def count(outcome):
        return metric(
            embed.url, "coserve:requests_total", True, endpoint="embeddings", outcome=outcome
        )

    before = count("bad_request")
    status, _ = request(embed.url + "/v1/embeddings", headers=AUTH)
    assert status == 405
    assert count("bad_request") == before + 1 and count("error") == 0


@pytest.mark.parametrize("user", [123, ["a"], {"id": "a"}, True])
def test_a_user_that_is_not_a_string_is_a_400_naming_it(gen, embed, user):
    """OpenAI and vLLM refuse it; it was ignored, whatever its type."""
    for url, path, body in (
        (embed.url, "/v1/embeddings", {"input": "a"}),
        (gen.url, "/v1/completions", {"prompt": [1], "max_tokens": 1}),
        (
            gen.url,
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "a"}], "max_tokens": 1},
        ),
    ):
        err = assert_openai_error(*send(url, path, {**body, "user": user}))
        assert err["param"] == "user" and "'user' must be a string" in err["message"], err
        for fine in ("", "someone", None):
            assert send(url, path, {**body, "user": fine})[0] == 200
