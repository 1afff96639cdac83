"""The streaming parser of the load generator, fed byte by byte as a socket might."""

import json

import pytest

from coserve.bench.records import EndpointRun
from coserve.bench.sse import GenStream, ReferenceStream


def _event(text, finish=None, token_ids=None, extra=None):
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    obj = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [choice],
    }
    if extra:
        obj.update(extra)
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


USAGE = (
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m",'
    b'"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":%d,'
    b'"total_tokens":%d}}\n\n'
)
DONE = b"data: [DONE]\n\n"


def _stream(window=(0.0, 1e9), chat=False):
    ep = EndpointRun("gen", "u", "m", 1)
    return ep, GenStream(ep, window[0], window[1], record_chunks=True, chat=chat)


def _feed(s, pieces, t0=0.0, dt=0.01):
    for i, piece in enumerate(pieces):
        s.feed(piece, t0 + i * dt)


TEXTS = [
    " a",
    'quote " inside',
    "back\\slash",
    'both \\" mixed\\\\',
    "",
    "\n newline",
    " unicode é",
    " tok",
]


def _plain_stream(n):
    evs = [_event(TEXTS[i % len(TEXTS)] or "x") for i in range(n - 1)]
    evs.append(_event(" end", finish="length"))
    return evs + [USAGE % (n, n + 3), DONE]


def test_one_event_per_read():
    ep, s = _stream()
    _feed(s, _plain_stream(20))
    assert s.error is None and s.error_event is None
    assert s.nchunks == 20 and s.ntok == 20 and s.usage_tokens == 20 and s.prompt_tokens == 3
    assert s.fast_prefix is not None  # the shape was learnt
    assert abs(s.first - 0.0) < 1e-12 and abs(s.last - 0.19) < 1e-12
    assert len(s.itl) == 19 and all(abs(x - 0.01) < 1e-9 for x in s.itl)
    assert ep.tokens_total == 20 and s.win_tok == 20


@pytest.mark.parametrize("size", [1, 7, 64, 100000])
def test_any_split_of_the_bytes_counts_the_same(size):
    data = b"".join(_plain_stream(30))
    _, s = _stream()
    _feed(s, [data[i : i + size] for i in range(0, len(data), size)], dt=0.0)
    assert s.error is None and s.nchunks == 30 and s.ntok == 30 and s.usage_tokens == 30


def test_two_events_in_one_read_are_two_chunks():
    evs = _plain_stream(10)
    _, s = _stream()
    _feed(s, [evs[0], evs[1] + evs[2], evs[3] + evs[4] + evs[5]] + evs[6:])
    assert s.nchunks == 10 and s.ntok == 10


def test_crlf_and_multiline_and_comments():
    raw = b"".join(_plain_stream(6)).replace(b"\n", b"\r\n")
    raw = b": keep-alive\r\n\r\n" + raw
    _, s = _stream()
    _feed(s, [raw[i : i + 50] for i in range(0, len(raw), 50)])
    assert s.nchunks == 6 and s.usage_tokens == 6
    # an event with its JSON over two data lines and no space after the colon
    ev = _event(" x").decode()
    body = ev[len("data: ") :].strip()
    two = f"event: message\ndata:{body[:20]}\ndata:{body[20:]}\n\n".encode()
    _, s = _stream()
    _feed(s, [two, two, USAGE % (2, 5), DONE])
    assert s.nchunks == 2 and s.ntok == 2


def test_token_ids_say_how_many_tokens_a_chunk_has():
    evs = [
        _event(" a b c", token_ids=[1, 2, 3]),
        _event("", token_ids=[]),
        _event(" d e", token_ids=[4, 5], finish="length"),
        USAGE % (5, 8),
        DONE,
    ]
    _, s = _stream()
    _feed(s, evs)
    assert s.ntok == 5 and s.nchunks == 2 and s.usage_tokens == 5


def test_an_empty_closing_chunk_is_no_token():
    evs = [_event(" a"), _event(" b"), _event("", finish="stop"), USAGE % (2, 5), DONE]
    _, s = _stream()
    _feed(s, evs)
    assert s.ntok == 2 and s.nchunks == 2


def test_window_counts_by_arrival_time():
    ep, s = _stream(window=(0.055, 0.155))
    _feed(s, _plain_stream(20))  # token i arrives at i * 10 ms
    assert s.win_tok == 10  # 60, 70, ..., 150 ms
    assert len(s.itl) == 10


def test_error_event_in_the_stream():
    err = b'data: {"error":{"message":"engine died","type":"server_error","code":500}}\n\n'
    _, s = _stream()
    _feed(s, [_event(" a"), err, DONE])
    assert s.error_event == "engine died"
    _, s = _stream()
    _feed(s, [_event(" a"), b'data: {"object":"error","message":"out of blocks"}\n\n'])
    assert s.error_event == "out of blocks"


def test_garbage_is_caught_not_raised():
    _, s = _stream()
    s.feed(b'data: {"choices":[], "usage":{ not json\n\n', 0.0)
    assert s.error is not None
    s.feed(_event(" a"), 0.01)  # ignored after an error
    assert s.nchunks == 0


def test_json_with_spaces_is_parsed_the_slow_way():
    def spaced(text, finish=None, ids=None):
        c = {"index": 0, "text": text, "finish_reason": finish}
        if ids is not None:
            c["token_ids"] = ids
        return b"data: " + json.dumps({"id": "x", "choices": [c]}).encode() + b"\n\n"

    usage = (
        b"data: "
        + json.dumps(
            {
                "id": "x",
                "choices": [],
                "usage": {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9},
            }
        ).encode()
        + b"\n\n"
    )
    evs = [
        spaced(" a"),
        spaced(" b", ids=[7, 8, 9]),
        spaced(" c"),
        spaced("", "stop"),
        spaced(" d", "length"),
        usage,
        DONE,
    ]
    ep, s = _stream()
    _feed(s, evs)
    assert s.error is None and s.fast_prefix is None
    assert s.nchunks == 4 and s.ntok == 6 and s.usage_tokens == 6 and s.prompt_tokens == 3
    assert len(s.itl) == 3


# ------------------------------------------------------------------ chat


def _chat_event(content=None, finish=None, role=False, token_ids=None, reasoning=None):
    delta = {} if reasoning is None else {"reasoning_content": reasoning, "content": None}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    obj = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [choice],
    }
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _chat_stream(n):
    evs = [_chat_event("", role=True)]  # vLLM's first chunk: the role, no token
    evs += [_chat_event(TEXTS[i % len(TEXTS)] or "y") for i in range(n - 1)]
    evs += [_chat_event(" end", finish="length"), USAGE % (n, n + 3), DONE]
    return evs


def test_chat_counts_content_deltas_not_the_role_chunk():
    ep, s = _stream(chat=True)
    _feed(s, _chat_stream(12))
    assert s.error is None and s.nchunks == 12 and s.ntok == 12 and s.usage_tokens == 12
    assert s.fast_prefix is not None and s.fast_prefix.endswith(b'"content":"')
    assert abs(s.first - 0.01) < 1e-12  # TTFT at the first content chunk, not the role's
    # an empty content delta mid-stream, or one with no content at all, carries no token
    _, s = _stream(chat=True)
    _feed(
        s,
        [
            _chat_event(" a"),
            _chat_event(" b"),
            _chat_event(""),
            _chat_event(None),
            _chat_event(None, finish="stop"),
            DONE,
        ],
    )
    assert s.ntok == 2 and s.nchunks == 2
    # reasoning tokens (delta.reasoning_content) are tokens too
    _, s = _stream(chat=True)
    _feed(s, [_chat_event(reasoning=" r"), _chat_event(reasoning=" s"), _chat_event(" a"), DONE])
    assert s.ntok == 3 and abs(s.first - 0.0) < 1e-12


# ------------------------------------------------------------------ fast path vs reference


def _streams():
    """Byte streams of every shape the counter meets, each with its chat flag."""
    err = b'data: {"error":{"message":"engine died","type":"server_error","code":500}}\n\n'
    spaced = (
        b'data: {"id": "x", "choices": [{"index": 0, "text": " s", "finish_reason": null}]}\n\n'
    )
    return [
        (_plain_stream(40), False),
        (
            [
                _event(" a b", token_ids=[1, 2]),
                _event("", token_ids=[]),
                _event(" c"),
                _event("", finish="stop"),
                USAGE % (3, 6),
                DONE,
            ],
            False,
        ),
        ([_event(" a"), _event(""), _event(" b"), spaced, _event(" c"), err, DONE], False),
        ([b": ping\n\n", _event(" a"), _event(" b", finish="length")], False),
        (_chat_stream(30), True),
        (
            [
                _chat_event("", role=True),
                _chat_event(" a", token_ids=[5]),
                _chat_event(""),
                _chat_event(" b"),
                _chat_event(None, finish="stop"),
                USAGE % (2, 5),
                DONE,
            ],
            True,
        ),
        (
            [
                _chat_event("", role=True),
                _chat_event(reasoning=" think"),
                _chat_event(reasoning=""),
                _chat_event(reasoning=" more"),
                _chat_event(" answer"),
                _chat_event(" x"),
                _chat_event(None, finish="stop"),
                USAGE % (4, 7),
                DONE,
            ],
            True,
        ),
    ]


@pytest.mark.parametrize("k", range(7))
@pytest.mark.parametrize("split", ["events", 1, 5, 33, "crlf", "all"])
def test_fast_path_and_reference_agree_on_the_same_bytes(k, split):
    events, chat = _streams()[k]
    data = b"".join(events)
    if split == "events":
        pieces = events
    elif split == "crlf":
        data = data.replace(b"\n", b"\r\n")
        pieces = [data[i : i + 17] for i in range(0, len(data), 17)]
    elif split == "all":
        pieces = [data]
    else:
        pieces = [data[i : i + split] for i in range(0, len(data), split)]
    window = (0.05, 0.25)
    _, fast = _stream(window, chat=chat)
    ref = ReferenceStream(*window, chat=chat)
    for n, piece in enumerate(pieces):
        fast.feed(piece, n * 0.01)
        ref.feed(piece, n * 0.01)
    assert fast.error is None and ref.error is None
    assert fast.chunk_times == [t for t, _ in ref.chunks]
    assert (fast.ntok, fast.win_tok) == (ref.ntok, ref.win_tok)
    assert list(fast.itl) == pytest.approx(ref.itl)
    assert (fast.usage_tokens, fast.prompt_tokens) == (ref.usage_tokens, ref.prompt_tokens)
    assert fast.error_event == ref.error_event
    assert fast.ep.tokens_total == ref.ntok
