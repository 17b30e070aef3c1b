"""The OpenAI request schemas, and turning a request body into a validated generation job.

Validation is the server's first line of defence: every malformed body must come back as a 4xx
whose message names the offending field, and nothing malformed may reach the engine thread,
where an exception would hurt every request in the batch. Hence:
  * the body is parsed by hand (not a framework's body binding) so that non-JSON, non-object,
    absurdly nested or non-UTF-8 bodies each get a precise 400;
  * the schemas are pydantic models in strict mode: "5" is not an int, true is not 1, NaN and
    infinities are refused, so a wrong type is never silently coerced;
  * limits that depend on the model (vocabulary, context window) and on the server (admission
    capacity) are checked in `build_job` with the same rules the engine applies, so
    `Engine.add_request` never raises for a request that got this far.
Fields OpenAI defines but this server does not implement (logprobs, penalties, logit_bias,
tools and functions, audio, ...) are accepted only at their neutral value and otherwise refused
by name, rather than silently ignored; unknown extra fields are ignored as OpenAI's own clients
send many. Extensions (as vLLM): top_k, ignore_eos, stop_token_ids; vLLM's other sampling
extensions (repetition_penalty, min_tokens, min_p, beam search, chat echo) are refused like
OpenAI's unimplemented fields, since a client sending them expects them to act. Text fields must
be valid Unicode (JSON's escapes can carry a lone surrogate, which the tokenizer cannot take).
And `expert_group`, for a model with expert groups (moeflow.model.expert_groups): a group name
for the whole request (prompt and generation), or a list of names, one per prompt token, for a
single prompt (generated tokens continue in the last one's group). A request that names none
takes the server's rule (`--group-rule modality`: moeflow.data.modality labels the prompt's
tokens), else (no rule, or a token-id prompt the rule cannot label) its `--default-group`; with
neither it is refused with a 400 naming the field, since guessing a group would answer from
experts trained on other data.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moeflow.data.groups import rule_group_ids
from moeflow.data.modality import prompt_token_labels
from moeflow.data.tokenizer import BPETokenizer
from moeflow.infer.sampling import SamplingParams
from moeflow.serve.chat import ChatTemplate, TemplateError

MAX_STOP_STRINGS = 4
_ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error",
                405: "invalid_request_error", 413: "invalid_request_error",
                429: "overloaded_error", 503: "service_unavailable_error"}


class RequestError(Exception):
    """A request the server refuses: HTTP status + OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message,
                          "type": _ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


def _unicode(s: str) -> str:
    """s, if it is valid Unicode text: JSON's \\uD800-style escapes can carry a lone surrogate,
    which no encoding (nor the tokenizer) takes."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"contains an unpaired surrogate U+{ord(s[e.start]):04X} at character "
                         f"{e.start} (not valid Unicode)") from None
    return s


def _finite(lo: float, hi: float, **kw: Any) -> Any:
    return Field(None, ge=lo, le=hi, allow_inf_nan=False, **kw)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class _CommonRequest(_Strict):
    model: str
    n: int | None = Field(None, ge=1)
    temperature: float | None = _finite(0.0, 2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: Any = ()
    stop_token_ids: list[int] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None
    presence_penalty: float | None = _finite(-2.0, 2.0)
    frequency_penalty: float | None = _finite(-2.0, 2.0)
    logit_bias: dict[str, float] | None = None
    # vLLM's sampling extensions beside the three taken (refused unless neutral)
    repetition_penalty: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    min_tokens: int | None = Field(None, ge=0)
    min_p: float | None = _finite(0.0, 1.0)
    use_beam_search: bool | None = None
    user: str | None = None
    expert_group: str | list[str] | None = None

    @field_validator("stop", mode="plain")
    @classmethod
    def _stop(cls, v: Any) -> tuple[str, ...]:
        if v is None:
            return ()
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise ValueError("must be a string or a list of strings")
        if len(items) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(items)}")
        if any(s == "" for s in items):
            raise ValueError("stop strings must not be empty")
        return tuple(map(_unicode, items))


class CompletionRequest(_CommonRequest):
    prompt: Any
    max_tokens: int | None = Field(None, ge=1)
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @field_validator("prompt", mode="plain")
    @classmethod
    def _prompt(cls, v: Any) -> list[str | list[int]]:
        """One or more prompts, each a string or a list of token ids."""
        def ids(x: Any) -> bool:
            return isinstance(x, list) and all(type(t) is int for t in x)

        if isinstance(v, str) or (ids(v) and v):
            return [_unicode(v) if isinstance(v, str) else v]
        if isinstance(v, list) and v and all(isinstance(p, str) or (ids(p) and p) for p in v):
            return [_unicode(p) if isinstance(p, str) else p for p in v]
        if isinstance(v, list) and not v:
            raise ValueError("must not be empty")
        raise ValueError("must be a string, a list of strings, a non-empty list of integer "
                         "token ids, or a list of such lists")


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else _unicode(v)

    @field_validator("content", mode="plain")
    @classmethod
    def _content(cls, v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, str):
            return _unicode(v)
        if isinstance(v, list):
            parts = []
            for i, part in enumerate(v):
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    raise ValueError(f"part {i} must be {{\"type\": \"text\", \"text\": <string>}}"
                                     f" (only text content is supported)")
                parts.append(part["text"])
            return _unicode("".join(parts))
        raise ValueError("must be a string or a list of text parts")


class ChatRequest(_CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list | None = None
    tool_choice: Any = None
    functions: list | None = None
    function_call: Any = None
    response_format: dict | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    echo: bool | None = None  # vLLM's: the reply prefixed with the last message


@dataclass(frozen=True)
class Limits:
    """What build_job checks against: the engine's and the server's bounds."""
    vocab_size: int
    max_seq_len: int
    capacity: int              # sequences admitted at once (max_batch + max_queue)
    default_max_tokens: int    # /v1/completions without max_tokens
    expert_groups: tuple[str, ...] = ()  # the model's group names (empty: no groups)
    group_rule: str | None = None  # labels the prompts of requests naming no group
    default_group: str | None = None  # else the group of requests naming none


@dataclass(frozen=True)
class Job:
    """A validated request: prompts x n choices, one SamplingParams per choice."""
    chat: bool
    prompts: tuple[tuple[int, ...], ...]
    prompt_texts: tuple[str, ...]
    n: int
    params: tuple[SamplingParams, ...]   # index = prompt_index * n + choice
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    echo: bool
    groups: tuple[tuple[int, ...], ...] | None = None  # per prompt, one group id per token

    @property
    def num_sequences(self) -> int:
        return len(self.params)

    def prompt_of(self, seq: int) -> int:
        return seq // self.n


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    if not raw.strip():
        raise RequestError(400, "request body is empty: expected a JSON object", "body")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise RequestError(400, "request body is nested too deeply", "body") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int too long
        raise RequestError(400, f"request body is not valid JSON: {e}", "body") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"request body must be a JSON object, got {type(data).__name__}",
                           "body")
    return data


def _param(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def validate(schema: type[BaseModel], data: dict) -> Any:
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = _param(tuple(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "is required"
        elif "input" in err and not isinstance(err["input"], (dict, list)):
            msg += f" (got {json.dumps(err['input'])[:80]})" if _jsonable(err["input"]) else ""
        raise RequestError(400, f"{param}: {msg}", param) from None
    except RecursionError:
        raise RequestError(400, "request body is nested too deeply", "body") from None


def _jsonable(x: Any) -> bool:
    try:
        json.dumps(x, allow_nan=True)
        return True
    except (TypeError, ValueError):
        return False


def _unsupported(req: _CommonRequest) -> None:
    def refuse(field: str, why: str = "is not supported by this server") -> None:
        raise RequestError(400, f"{field}: {why}", field)

    for field in ("presence_penalty", "frequency_penalty"):
        if getattr(req, field) not in (None, 0):
            refuse(field, "is not supported by this server (only 0)")
    if req.logit_bias:
        refuse("logit_bias")
    for field, neutral in (("repetition_penalty", 1), ("min_tokens", 0), ("min_p", 0),
                           ("use_beam_search", False)):
        if getattr(req, field) not in (None, neutral):
            refuse(field, f"is not supported by this server (only {json.dumps(neutral)})")
    if isinstance(req, CompletionRequest):
        if req.logprobs is not None:  # 0 too: OpenAI then returns the sampled tokens' logprobs
            refuse("logprobs")
        if req.suffix:
            refuse("suffix")
        if req.best_of is not None and req.best_of != (req.n or 1):
            refuse("best_of", "is not supported by this server (only equal to n)")
    else:
        if req.logprobs or req.top_logprobs:
            refuse("logprobs" if req.logprobs else "top_logprobs")
        if req.tools:
            refuse("tools")
        if req.functions:
            refuse("functions")
        for field in ("tool_choice", "function_call"):
            if getattr(req, field) not in (None, "none", "auto"):
                refuse(field, "is not supported by this server (no tools: only \"none\" or "
                              "\"auto\")")
        if req.response_format and req.response_format.get("type", "text") != "text":
            refuse("response_format", "only {\"type\": \"text\"} is supported")
        if req.modalities not in (None, ["text"]):
            refuse("modalities", "only [\"text\"] is supported")
        for field in ("audio", "prediction"):
            if getattr(req, field) is not None:
                refuse(field)
        if req.echo:
            refuse("echo", "is not supported for chat by this server")


def build_job(req: CompletionRequest | ChatRequest, limits: Limits, tokenizer: BPETokenizer,
              template: ChatTemplate | None = None) -> Job:
    """Tokenize and check a schema-valid request against the model's and server's limits."""
    _unsupported(req)
    chat = isinstance(req, ChatRequest)
    field = "messages" if chat else "prompt"
    if chat:
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        try:
            text = template.render(messages)
        except TemplateError as e:
            raise RequestError(400, f"messages: {e}", "messages") from None
        raw_prompts: list[str | list[int]] = [text]
        encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    else:
        raw_prompts = req.prompt
        encode = tokenizer.encode
    n = req.n or 1
    if n * len(raw_prompts) > limits.capacity:
        raise RequestError(400, f"n: {n} choices x {len(raw_prompts)} prompts exceeds the "
                                f"server's capacity of {limits.capacity} sequences", "n")
    prompts, texts = [], []
    for i, p in enumerate(raw_prompts):
        where = field if len(raw_prompts) == 1 else f"{field}[{i}]"
        ids = encode(p) if isinstance(p, str) else p
        if not ids:
            raise RequestError(400, f"{where}: encodes to no tokens", where)
        bad = next((t for t in ids if not 0 <= t < limits.vocab_size), None)
        if bad is not None:
            raise RequestError(400, f"{where}: token id {bad} is outside the vocabulary "
                                    f"[0, {limits.vocab_size})", where)
        if len(ids) >= limits.max_seq_len:
            raise RequestError(400, f"{where}: {len(ids)} tokens leave no room in the context "
                                    f"window of {limits.max_seq_len} tokens", where)
        prompts.append(tuple(ids))
        texts.append(p if isinstance(p, str) else tokenizer.decode(list(ids)))

    max_field = "max_tokens"
    max_tokens = req.max_tokens
    if chat and req.max_completion_tokens is not None:
        max_field, max_tokens = "max_completion_tokens", req.max_completion_tokens
    longest = max(map(len, prompts))
    if max_tokens is None:
        room = limits.max_seq_len - longest
        max_tokens = room if chat else min(limits.default_max_tokens, room)
    elif max_tokens > limits.max_seq_len:
        raise RequestError(400, f"{max_field}: {max_tokens} is beyond the context window of "
                                f"{limits.max_seq_len} tokens", max_field)
    elif longest + max_tokens > limits.max_seq_len:
        raise RequestError(400, f"{max_field}: prompt ({longest} tokens) + {max_field} "
                                f"({max_tokens}) = {longest + max_tokens} exceeds the context "
                                f"window of {limits.max_seq_len} tokens", max_field)

    stop_ids = tuple(req.stop_token_ids or ())
    bad = next((t for t in stop_ids if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise RequestError(400, f"stop_token_ids: token id {bad} is outside the vocabulary "
                                f"[0, {limits.vocab_size})", "stop_token_ids")
    if not req.ignore_eos:
        stop_ids = tuple(dict.fromkeys(stop_ids + tokenizer.eos_ids))
    temperature = 1.0 if req.temperature is None else float(req.temperature)
    top_p = 1.0 if req.top_p is None else float(req.top_p)
    top_k = max(req.top_k or 0, 0)
    params = []
    for seq in range(n * len(prompts)):
        seed = secrets.randbits(63) if req.seed is None else (req.seed + seq) % 2**63
        params.append(SamplingParams(max_new_tokens=max_tokens, temperature=temperature,
                                     top_k=top_k, top_p=top_p, seed=seed,
                                     stop_token_ids=stop_ids))
    groups = _prompt_groups(req, limits, tokenizer, raw_prompts, prompts,
                            False if chat else None)
    opts = req.stream_options
    return Job(groups=groups, chat=chat, prompts=tuple(prompts), prompt_texts=tuple(texts), n=n,
               params=tuple(params), stop=req.stop, stream=bool(req.stream),
               include_usage=bool(opts and opts.include_usage), echo=bool(
                   not chat and req.echo))


def _prompt_groups(req: _CommonRequest, limits: Limits, tokenizer: BPETokenizer,
                   raw_prompts: list, prompts: list[tuple[int, ...]], special: bool | None
                   ) -> tuple[tuple[int, ...], ...] | None:
    """Each prompt's token groups (module docstring), or None for a model without groups."""
    names, given = limits.expert_groups, req.expert_group
    field = "expert_group"
    if not names:
        if given is not None:
            raise RequestError(400, f"{field}: this model has no expert groups", field)
        return None

    def gid(name: str) -> int:
        if name not in names:
            raise RequestError(400, f"{field}: {name!r} is not one of the model's expert groups "
                                    f"({', '.join(names)})", field)
        return names.index(name)

    if isinstance(given, str):
        return tuple((gid(given),) * len(p) for p in prompts)
    if given is not None:
        if len(prompts) != 1:
            raise RequestError(400, f"{field}: a list (one group per prompt token) needs a "
                                    f"single prompt, got {len(prompts)}", field)
        if len(given) != len(prompts[0]):
            raise RequestError(400, f"{field}: {len(given)} groups for a prompt of "
                                    f"{len(prompts[0])} tokens", field)
        return (tuple(gid(g) for g in given),)
    default = None if limits.default_group is None else gid(limits.default_group)
    if limits.group_rule is not None:
        lut = rule_group_ids(limits.group_rule, names)
        out = []
        for raw, ids in zip(raw_prompts, prompts):
            text = raw if isinstance(raw, str) else tokenizer.decode(list(ids))
            got, labels = prompt_token_labels(tokenizer, text, special)
            if tuple(got) == ids:
                out.append(tuple(int(lut[x]) for x in labels))
            elif default is not None:  # a token-id prompt its text does not re-encode to
                out.append((default,) * len(ids))
            else:
                raise RequestError(400, f"{field}: required for this token-id prompt (the "
                                        f"server's rule labels text, and the prompt's text "
                                        f"encodes to other tokens)", field)
        return tuple(out)
    if default is not None:
        return tuple((default,) * len(p) for p in prompts)
    raise RequestError(400, f"{field}: the model routes inside expert groups "
                            f"({', '.join(names)}); name one for the request (or start the "
                            f"server with --group-rule modality or --default-group NAME)", field)
