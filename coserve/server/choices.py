"""One choice of a completion or chat answer, built as the engine's tokens arrive: its text
(decoded a few tokens at a time), `stop` strings, logprobs and how it ended.

Stop strings are the front's job, as in vLLM: the text is searched as it grows, a match ends
the choice with finish_reason "stop" and stop_reason the string, and the string is not part
of the text. While streaming, the last len(longest stop) - 1 characters are held back so a
stop string split across tokens is never sent."""

from __future__ import annotations

from coserve.server.detokenize import IncrementalDecoder


def token_text(tokenizer, token_id: int) -> str:
    """A token as logprobs show it: its text, or `token_id:N` for a model without a tokenizer
    (vLLM's --return-tokens-as-token-ids form)."""
    return tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"


class Choice:
    __slots__ = (
        "index",
        "tokenizer",
        "decoder",
        "stops",
        "hold",
        "pending",
        "ids",
        "text",
        "finish",
        "stop_reason",
        "logprobs",
        "num_logprobs",
        "offset",
        "stop_token_ids",
    )

    def __init__(
        self,
        index: int,
        tokenizer,
        stops: list[str],
        num_logprobs: int | None,
        stop_token_ids: tuple[int, ...] = (),
    ):
        self.index = index
        self.tokenizer = tokenizer
        self.decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else None
        self.stops = stops
        self.hold = max(map(len, stops)) - 1 if stops else 0
        self.pending = ""  # decoded text not yet handed out (stop strings are searched here)
        self.ids: list[int] = []
        self.text: list[str] = []  # what has been handed out
        self.finish: str | None = None
        self.stop_reason: str | int | None = None
        self.num_logprobs = num_logprobs
        self.logprobs: list[tuple] = []  # (token id, logprob, top ids, top logprobs) per token
        self.offset = 0  # characters of the token texts so far (completions' text_offset)
        self.stop_token_ids = stop_token_ids

    @property
    def stopped_by_text(self) -> bool:
        """Ended by a stop string, so the engine's sequence must be aborted."""
        return isinstance(self.stop_reason, str)

    def advance(self, new_ids: list[int], lps: list, reason: str | None) -> str:
        """Take the tokens of one or more engine outputs; returns the text they release.
        `lps`: one engine logprobs tuple (or None) per new id."""
        self.ids.extend(new_ids)
        if self.num_logprobs is not None:
            for t, lp in zip(new_ids, lps, strict=True):
                if lp is not None:
                    self.logprobs.append((t, lp[0], lp[2], lp[3]))
        if (
            reason == "stop"
            and self.stop_token_ids
            and new_ids
            and new_ids[-1] in self.stop_token_ids
        ):
            self.stop_reason = new_ids[-1]  # vLLM names the stop token that ended it
        if reason is not None:
            self.finish = reason
        if self.decoder is None:
            return ""
        self.pending += self.decoder.add(new_ids, final=reason is not None)
        if self.stops:
            hit = min(
                ((i, s) for s in self.stops if (i := self.pending.find(s)) >= 0), default=None
            )
            if hit is not None:
                out = self.pending[: hit[0]]
                self.pending = ""
                self.finish, self.stop_reason = "stop", hit[1]
                self.text.append(out)
                return out
        if reason is not None or not self.hold:
            out, self.pending = self.pending, ""
        else:
            cut = max(0, len(self.pending) - self.hold)
            out, self.pending = self.pending[:cut], self.pending[cut:]
        self.text.append(out)
        return out

    # ---- logprobs, as OpenAI/vLLM shape them ---------------------------------------------
    def completion_logprobs(self, entries: list[tuple]) -> dict:
        """{"tokens", "token_logprobs", "top_logprobs", "text_offset"} for `entries`."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, lp, top_ids, top_lps in entries:
            text = token_text(self.tokenizer, token)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp)
            top: dict[str, float] = {}
            for t, v in zip(
                top_ids, top_lps, strict=True
            ):  # most likely first: it keeps a shared text
                top.setdefault(token_text(self.tokenizer, t), v)
            top.setdefault(text, lp)  # vLLM lists the sampled token too
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out

    def chat_logprobs(self, entries: list[tuple]) -> dict:
        """{"content": [{"token", "logprob", "bytes", "top_logprobs"}]} for `entries`."""

        def item(t: int, v: float) -> dict:
            text = token_text(self.tokenizer, t)
            return {"token": text, "logprob": v, "bytes": list(text.encode("utf-8", "replace"))}

        return {
            "content": [
                {
                    **item(token, lp),
                    "top_logprobs": [item(t, v) for t, v in zip(top_ids, top_lps, strict=True)],
                }
                for token, lp, top_ids, top_lps in entries
            ]
        }
