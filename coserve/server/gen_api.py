"""/v1/completions and /v1/chat/completions over the gen engine: one engine sequence per
choice, answered whole or streamed as server-sent events, in OpenAI's/vLLM's shapes
(text_completion; chat.completion and chat.completion.chunk with delta.role/content).

Per token, streaming writes only what changes (text, ids, finish): the rest of each event is
formatted once per choice, so the front stays cheap at thousands of tokens per second."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from aiohttp import web

from coserve.engine.messages import GenOut, NewGen
from coserve.server.body import json_response, read_request
from coserve.server.chat import parse_chat
from coserve.server.choices import Choice
from coserve.server.engine_client import EngineClient, RequestStream
from coserve.server.errors import Aborted, ApiError
from coserve.server.fields import RequestLimits
from coserve.server.metrics import Metrics
from coserve.server.protocol import GenRequest, parse_completion

OUTCOME = "coserve_outcome"  # request key a handler sets when it ended a 200 early
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


@dataclass(frozen=True)
class Shape:
    """What differs between the two endpoints' answers."""

    id_prefix: str
    object: str
    chunk_object: str
    chat: bool


COMPLETION = Shape("cmpl", "text_completion", "text_completion", chat=False)
CHAT = Shape("chatcmpl", "chat.completion", "chat.completion.chunk", chat=True)


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


class GenApi:
    def __init__(
        self, engine: EngineClient, metrics: Metrics, served_names: list[str], limits: RequestLimits
    ):
        self.engine = engine
        self.metrics = metrics
        self.served_names = served_names
        self.limits = limits
        self.tokenizer = engine.tokenizer

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = await read_request(
            request,
            parse_completion,
            self.served_names,
            self.tokenizer,
            self.engine.max_model_len,
            self.limits,
            self.engine.eos_token_ids,
        )
        return await self._serve(request, req, COMPLETION)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        req = await read_request(
            request,
            parse_chat,
            self.served_names,
            self.tokenizer,
            self.engine.max_model_len,
            self.limits,
            self.engine.eos_token_ids,
        )
        return await self._serve(request, req, CHAT)

    async def _serve(self, request, req: GenRequest, shape: Shape) -> web.StreamResponse:
        cid = f"{shape.id_prefix}-{uuid.uuid4().hex}"
        rids = [f"{cid}-{i}" for i in range(len(req.prompts))]
        stream = RequestStream()
        await self.engine.add(
            [
                NewGen(rid, ids, params)
                for rid, ids, params in zip(rids, req.prompts, req.params, strict=True)
            ],
            stream,
            "messages" if shape is CHAT else "prompt",
        )
        choices = [
            Choice(i, self.tokenizer, req.stop, req.logprobs, p.stop_token_ids)
            for i, p in enumerate(req.params)
        ]
        pending = set(rids)
        try:
            if req.stream:
                return await self._stream(request, req, shape, cid, rids, choices, stream, pending)
            return await self._full(req, shape, cid, rids, choices, stream, pending)
        finally:
            if pending:  # client gone, shutdown, or an error: free the engine's slots
                self.engine.abort(pending)

    def _usage(self, req: GenRequest, choices: list[Choice]) -> dict:
        n = len(req.prompts) // req.num_prompts
        p = sum(
            len(ids) for ids in req.prompts[::n]
        )  # each prompt once, however many choices (vLLM)
        c = sum(len(ch.ids) for ch in choices)
        return {"prompt_tokens": p, "total_tokens": p + c, "completion_tokens": c}

    def _advance(
        self,
        outputs: list[GenOut],
        index: dict,
        choices: list[Choice],
        rids: list[str],
        pending: set,
    ) -> dict[int, tuple[Choice, str, list[int], int]]:
        """Hand the engine's outputs to their choices, coalesced per choice:
        {choice index: (choice, new text, new ids, logprobs entries before)}."""
        grouped: dict[int, list] = {}
        for out in outputs:
            entry = grouped.setdefault(index[out.request_id], [[], [], None])
            entry[0].extend(out.new_token_ids)
            entry[1].append(out.logprobs)
            if out.finished:
                entry[2] = out.finish_reason or "stop"
        out = {}
        for i, (ids, lps, reason) in grouped.items():
            c = choices[i]
            if c.finish is not None:  # ended by a stop string; its engine sequence is being aborted
                continue
            before = len(c.logprobs)
            text = c.advance(ids, lps, reason)
            if c.finish is not None:
                pending.discard(rids[i])
                self.metrics.finished[c.finish] += 1
                if c.stopped_by_text and reason is None:
                    self.engine.abort([rids[i]])
            out[i] = (c, text, ids, before)
        return out

    # ---- whole answers -------------------------------------------------------------------
    async def _full(self, req, shape, cid, rids, choices, stream, pending) -> web.Response:
        index = {rid: i for i, rid in enumerate(rids)}
        while pending:
            try:
                outputs = await stream.next_batch()
            except Aborted:
                self.metrics.finished["abort"] += len(pending)
                raise
            self._advance(outputs, index, choices, rids, pending)
        body = []
        for c in choices:
            text = "".join(c.text)
            if shape.chat:
                lp = c.chat_logprobs(c.logprobs) if c.num_logprobs is not None else None
                body.append(
                    {
                        "index": c.index,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": lp,
                        "finish_reason": c.finish,
                        "stop_reason": c.stop_reason,
                        "token_ids": c.ids,
                    }
                )
            else:
                lp = c.completion_logprobs(c.logprobs) if c.num_logprobs is not None else None
                body.append(
                    {
                        "index": c.index,
                        "text": text,
                        "logprobs": lp,
                        "finish_reason": c.finish,
                        "stop_reason": c.stop_reason,
                        "token_ids": c.ids,
                    }
                )
        return json_response(
            {
                "id": cid,
                "object": shape.object,
                "created": int(time.time()),
                "model": req.model,
                "choices": body,
                "usage": self._usage(req, choices),
            }
        )

    # ---- streamed answers ----------------------------------------------------------------
    async def _stream(
        self, request, req, shape, cid, rids, choices, stream, pending
    ) -> web.StreamResponse:
        index = {rid: i for i, rid in enumerate(rids)}
        head = (
            f'data: {{"id":"{cid}","object":"{shape.chunk_object}","created":{int(time.time())},'
            f'"model":{_dumps(req.model)},"choices":['
        )
        text_key = '"delta":{"content":' if shape.chat else '"text":'
        text_end = "}" if shape.chat else ""
        starts = [f'{head}{{"index":{i},{text_key}' for i in range(len(rids))]
        fixed_tail = (
            None
            if req.continuous_usage
            else ('],"usage":null}\n\n' if req.include_usage else "]}\n\n")
        )

        def event(c: Choice, text: str, ids: list[int], lp_from: int) -> str:
            tail = fixed_tail or f'],"usage":{_dumps(self._usage(req, choices))}}}\n\n'
            id_text = str(ids[0]) if len(ids) == 1 else ",".join(map(str, ids))
            finish = "null" if c.finish is None else f'"{c.finish}"'
            lp = "null"
            if c.num_logprobs is not None:
                entries = c.logprobs[lp_from:]
                lp = _dumps(
                    c.chat_logprobs(entries) if shape.chat else c.completion_logprobs(entries)
                )
            stop = "null" if c.stop_reason is None else _dumps(c.stop_reason)
            return (
                f'{starts[c.index]}{_dumps(text)}{text_end},"logprobs":{lp},"finish_reason":{finish},'
                f'"stop_reason":{stop},"token_ids":[{id_text}]}}{tail}'
            )

        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        try:
            if shape.chat:  # vLLM's first chunk per choice: the role, no content yet
                tail = fixed_tail or f'],"usage":{_dumps(self._usage(req, choices))}}}\n\n'
                await resp.write(
                    "".join(
                        f'{head}{{"index":{i},"delta":{{"role":"assistant","content":""}},"logprobs":null,'
                        f'"finish_reason":null}}{tail}'
                        for i in range(len(rids))
                    ).encode()
                )
            while pending:
                try:
                    outputs = await stream.next_batch()
                except Aborted:  # shutting down: end each open choice with finish_reason "abort"
                    request[OUTCOME] = "aborted"
                    ended = sorted(index[rid] for rid in pending)
                    pending.clear()
                    self.metrics.finished["abort"] += len(ended)
                    parts = []
                    for i in ended:
                        choices[i].finish = "abort"
                        parts.append(event(choices[i], "", [], len(choices[i].logprobs)))
                    await resp.write("".join(parts).encode())
                    break
                except ApiError as e:  # the engine failed: headers are out, so say it in the stream
                    request[OUTCOME] = e.outcome
                    pending.clear()
                    await resp.write(f"data: {json.dumps(e.body())}\n\n".encode())
                    break
                new = self._advance(outputs, index, choices, rids, pending)
                await resp.write(
                    "".join(
                        event(c, text, ids, before) for c, text, ids, before in new.values()
                    ).encode()
                )
            if req.include_usage:
                await resp.write(
                    f'{head}],"usage":{_dumps(self._usage(req, choices))}}}\n\n'.encode()
                )
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:  # client went away mid-stream; `pending` gets aborted
            request[OUTCOME] = "aborted"
        return resp
