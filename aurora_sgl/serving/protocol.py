"""Request bodies of the HTTP API (OpenAI and SGLang-native) and their mapping to SamplingParams.

Type errors are caught by pydantic (422); values pydantic cannot judge (NaN, ranges, stop lists)
are checked by SamplingParams (400). Both come back as OpenAI-shaped errors.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from aurora_sgl.engine.sampling import MAX_TOP_LOGPROBS, SamplingParams

MAX_N = 16


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code or str(status)


def error_body(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "code": code or str(status)}}


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


Number = StrictInt | StrictFloat


_NOT_NEUTRAL = object()
# OpenAI fields this server does not implement, with the values that leave generation unchanged.
OPENAI_NEUTRAL: dict[str, tuple] = {
    "best_of": (1,),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "parallel_tool_calls": (True, False),  # no tools: nothing to call in parallel
    "top_logprobs": (0,),
    "modalities": (["text"],),
    "store": (False,),
    "metadata": ({},),
}


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    n: StrictInt = 1
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: StrictInt | None = None
    ignore_eos: StrictBool = False
    user: StrictStr | None = None
    frequency_penalty: Number | None = None
    presence_penalty: Number | None = None
    logit_bias: dict[StrictStr, Number] | None = None
    # SGLang's extensions of the OpenAI body
    repetition_penalty: Number | None = None
    min_tokens: StrictInt | None = None
    response_format: dict[str, Any] | None = None
    regex: StrictStr | None = None
    ebnf: StrictStr | None = None

    def unhonoured(self) -> list[str]:
        """Fields sent that this server would not honour: anything it does not implement, unless
        at the value that means "off" (OpenAI clients send some of them by default)."""
        out = []
        for name, value in (self.model_extra or {}).items():
            neutral = OPENAI_NEUTRAL.get(name, _NOT_NEUTRAL)
            if value is None or (neutral is not _NOT_NEUTRAL and value in neutral):
                continue
            if name == "best_of" and value == self.n:  # best of n among n: no extra sampling
                continue
            out.append(name)
        return sorted(out)

    def logprob_options(self) -> dict:
        """SamplingParams' logprob fields this body asks for (none by default)."""
        return {}

    def sampling_params(self, default_max_tokens: int, index: int = 0) -> SamplingParams:
        if not 1 <= self.n <= MAX_N:
            raise APIError(400, f"n must be between 1 and {MAX_N}, got {self.n}")
        seed = None if self.seed is None else self.seed + index
        return build_params(
            max_new_tokens=default_max_tokens if self.max_tokens is None else self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,  # OpenAI's default
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            stop=self.stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            seed=seed,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            min_new_tokens=self.min_tokens or 0,
            logit_bias=self.logit_bias,
            regex=self.regex,
            ebnf=self.ebnf,
            json_schema=schema_of_response_format(self.response_format),
            **self.logprob_options(),
        )


def schema_of_response_format(fmt: dict | None) -> str | None:
    """OpenAI's response_format as SGLang maps it: json_object -> any JSON object, json_schema ->
    its `schema` (as JSON text), text -> unconstrained."""
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return '{"type": "object"}'
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError(400, "response_format.json_schema.schema must be a JSON schema object")
        return json.dumps(schema)
    raise APIError(400, f"response_format.type must be text, json_object or json_schema, got {kind!r}")


def _check_top(name: str, value: int | None) -> None:
    if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"{name} must be between 0 and {MAX_TOP_LOGPROBS}, got {value}", code="invalid_value")


class CompletionRequest(_SamplingFields):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    echo: StrictBool = False
    logprobs: StrictInt | None = None  # top alternatives per position (0: the chosen token's only)
    suffix: StrictStr | None = None

    def logprob_options(self) -> dict:
        """SGLang's mapping: logprobs N -> return_logprob with N alternatives; with echo the
        prompt's logprobs too (from its first token, whose logprob is null)."""
        _check_top("logprobs", self.logprobs)
        if self.logprobs is None:
            return {}
        return {
            "return_logprob": True,
            "top_logprobs_num": self.logprobs,
            "logprob_start_len": 0 if self.echo else -1,
        }


class ChatMessage(BaseModel):
    # Other message fields (name, tool_calls, tool_call_id, reasoning_content, ...) are kept so
    # that chat_messages can refuse them by name: the template would drop them without a word.
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant"]
    content: StrictStr | list[dict[str, Any]]


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None

    def logprob_options(self) -> dict:
        _check_top("top_logprobs", self.top_logprobs)
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs: true", code="invalid_value")
        if not self.logprobs:
            return {}
        return {"return_logprob": True, "top_logprobs_num": self.top_logprobs or 0}


# Top-level /generate fields of SGLang's GenerateReqInput this server does not implement, with the
# values that change nothing.
NATIVE_NEUTRAL: dict[str, tuple] = {
    "image_data": ([], ""),
    "audio_data": ([], ""),
    "video_data": ([], ""),
    "modalities": ([],),
    "lora_path": ("",),
    "return_hidden_states": (False,),
    "return_routed_experts": (False,),  # SGLang's bench_serving sends it on every request
    "custom_logit_processor": ("",),
    "log_metrics": (True, False),
    "session_params": ({},),
    "data_parallel_rank": (),
}


class NativeGenerateRequest(BaseModel):
    """SGLang's /generate body (the fields this server honours; the rest must keep defaults)."""

    model_config = ConfigDict(extra="allow")

    text: StrictStr | list[StrictStr] | None = None
    input_ids: list[StrictInt] | list[list[StrictInt]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    stream: StrictBool = False
    rid: StrictStr | list[StrictStr] | None = None
    return_logprob: StrictBool | list[StrictBool] = False
    top_logprobs_num: StrictInt | list[StrictInt] = 0
    logprob_start_len: StrictInt | list[StrictInt] = -1
    token_ids_logprob: list[StrictInt] | list[list[StrictInt]] | None = None
    return_text_in_logprobs: StrictBool = False

    def logprob_options(self, n: int, batch: bool) -> list[dict]:
        """Per prompt, SamplingParams' logprob fields. Each option is one value for all prompts
        or, in a batch, a list with one per prompt (SGLang's rule); token_ids_logprob is a list
        of ids, or a list of such lists in a batch."""

        def per_prompt(name: str, value, is_list) -> list:
            if is_list:
                if not batch or len(value) != n:
                    raise APIError(400, f"{name}: a list needs one value per prompt of a batch ({n})")
                return list(value)
            return [value] * n

        ret = per_prompt("return_logprob", self.return_logprob, isinstance(self.return_logprob, list))
        top = per_prompt("top_logprobs_num", self.top_logprobs_num, isinstance(self.top_logprobs_num, list))
        start = per_prompt("logprob_start_len", self.logprob_start_len, isinstance(self.logprob_start_len, list))
        t = self.token_ids_logprob
        ids = per_prompt("token_ids_logprob", t, bool(t) and isinstance(t[0], list))
        opts = []
        for r, k, s, i in zip(ret, top, start, ids):
            if not r:  # SGLang ignores the options when return_logprob is off
                opts.append({})
                continue
            _check_top("top_logprobs_num", k)
            if s < -1:
                raise APIError(400, f"logprob_start_len must be >= -1, got {s}")
            opts.append(
                {
                    "return_logprob": True,
                    "top_logprobs_num": k,
                    "logprob_start_len": s,
                    "token_ids_logprob": None if i is None else tuple(i),
                }
            )
        return opts

    def unhonoured(self) -> list[str]:
        """Top-level fields sent that this server would not honour (see NATIVE_NEUTRAL)."""
        out = []
        for name, value in (self.model_extra or {}).items():
            if value is None:
                continue
            if value not in NATIVE_NEUTRAL.get(name, ()):
                out.append(name)
        return sorted(out)


# SGLang sampling keys we accept at their neutral value only (sent by frontend-language programs).
_NEUTRAL = {
    "min_p": 0.0,
    "n": 1,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "no_stop_trim": False,
    "structural_tag": None,
    "custom_params": None,
    "stream_interval": None,
    "stop_regex": None,
}
_NATIVE_KEYS = {
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "min_new_tokens",
    "logit_bias",
    "regex",
    "json_schema",
    "ebnf",
}


def native_sampling_params(raw: dict | None, default_max_new_tokens: int = 128) -> SamplingParams:
    raw = dict(raw or {})
    if raw.get("sampling_seed") is not None:  # SGLang 0.5.23's name for the seed
        if raw.get("seed") is not None and raw["seed"] != raw["sampling_seed"]:
            raise APIError(400, "sampling_params: seed and sampling_seed differ; send one of them")
        raw["seed"] = raw["sampling_seed"]
    raw.pop("sampling_seed", None)
    unknown = [k for k in raw if k not in _NATIVE_KEYS and k not in _NEUTRAL]
    if unknown:
        raise APIError(400, f"unsupported sampling_params: {', '.join(sorted(unknown))}")
    odd = [k for k, neutral in _NEUTRAL.items() if k in raw and raw[k] not in (None, "", [], {}) and raw[k] != neutral]
    if odd:
        raise APIError(
            400, f"sampling_params not supported by this server (must keep their default): {', '.join(sorted(odd))}"
        )
    kwargs = {k: raw[k] for k in _NATIVE_KEYS if k in raw and raw[k] is not None}
    if kwargs.get("stop") == []:  # frontend-language programs send an empty stop list
        del kwargs["stop"]
    kwargs.setdefault("max_new_tokens", default_max_new_tokens)
    if "seed" in raw and raw["seed"] is None:
        kwargs.pop("seed", None)
    if isinstance(kwargs.get("json_schema"), dict):  # SGLang wants text; clients often send the object
        kwargs["json_schema"] = json.dumps(kwargs["json_schema"])
    if "stop_token_ids" in kwargs and isinstance(kwargs["stop_token_ids"], list):
        kwargs["stop_token_ids"] = tuple(kwargs["stop_token_ids"])
    return build_params(**kwargs)


def build_params(**kwargs) -> SamplingParams:
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e)) from None
