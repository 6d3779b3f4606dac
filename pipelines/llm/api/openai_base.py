"""What the OpenAI-shaped APIs share: request checks, sampling fields, the chat prompt and stream framing.

Chat and text completions take vLLM's extra parameters as its OpenAI server
does (``ignore_eos``, ``min_tokens``, ``structured_outputs``, ...), so clients
written for ``vllm serve`` work unchanged; a parameter neither OpenAI nor vLLM
defines is a 400 naming it (the schemas forbid unknown fields).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic_core import to_json

from pipelines.llm.api import LLMAPI, bad, in_band_error
from pipelines.llm.conversation import require_turns, turn
from pipelines.llm.engine import Sampling
from pipelines.llm.limits import check_schemas, json_document
from pipelines.llm.replies import NOTHING, PromptLogprobs, Reply, usage_json
from pipelines.llm.schema import PromptLogprob
from pipelines.llm.tools import ToolPlan
from runner.pipeline import RequestContext


TOKEN_ID_KEY = re.compile(r"-?[0-9]{1,10}")  # at most ten digits: int() of it is quick, and no vocabulary is larger


class ChunkEnvelope:
    """What every streamed chunk of one OpenAI answer shares, prebuilt once per request as bytes."""

    def __init__(self, object_name: str, answer_id: str, created: int, model: str, include_usage: bool) -> None:
        self.head = b'{"id":%s,"object":%s,"created":%d,"model":%s,"choices":[' % (
            to_json(answer_id), to_json(object_name), created, to_json(model)
        )
        self.tail = b'],"usage":null}' if include_usage else b"]}"
        self.include_usage = include_usage

    def chunk(self, choice: bytes) -> bytes:
        return self.head + choice + self.tail

    def usage_chunk(self, context: RequestContext) -> bytes:
        """The last chunk when stream_options.include_usage asks for it: no choices, the usage."""
        return self.head + b'],"usage":' + usage_json(context) + b"}"


class OpenAIReply(Reply):
    """What chat and text completions' answers share: the chunk envelope, the usage chunk that ends a stream when
    asked for, and OpenAI's error document as a failed stream's ending."""

    envelope: ChunkEnvelope

    def closing(self) -> list[bytes] | tuple:
        if self.streaming and self.envelope.include_usage:
            return [self.envelope.usage_chunk(self.tracker.context)]
        return NOTHING

    def error_event(self, reason: str) -> bytes:
        return in_band_error("openai", reason)


class OpenAIAPI(LLMAPI):
    """The shared checks and sampling fields of OpenAI's chat and text completions."""

    async def openai_chat_prompt(self, request: Any, tool_choice: str | dict | None = None,
                                 parallel_tool_calls: bool | None = None, chat_template_kwargs: dict | None = None,
                                 documents: list[dict] | None = None) -> tuple[list[int], ToolPlan, list[dict]]:
        """An OpenAI chat request's prompt (chat completions, and /tokenize's count of it), its tool plan and its
        turns."""
        tools = [tool.model_dump(exclude_none=True, by_alias=True) for tool in request.tools or []]
        turns = chat_turns(request.messages)
        prompt, plan = await self.chat_prompt(
            turns, tools, tool_choice, parallel_tool_calls,
            add_generation_prompt=generation_prompt(request),
            continue_final_message=bool(request.continue_final_message),
            chat_template_kwargs=chat_template_kwargs, documents=documents,
            add_special_tokens=bool(request.add_special_tokens),
        )
        return prompt, plan, turns

    @staticmethod
    def include_usage(request: Any) -> bool:
        if request.stream_options is not None and not request.stream:
            raise bad("stream_options needs stream: true", "stream_options")
        return bool(request.stream_options and request.stream_options.include_usage)

    def logit_bias(self, bias: dict[str, float] | None) -> dict[int, float] | None:
        if not bias:
            return None
        vocab = self.generation.vocab_size
        parsed = {}
        for key, value in bias.items():
            # A token id written as JSON writes an integer: digits, nothing else ("--1", "1e3" and "١" are no ids).
            if not TOKEN_ID_KEY.fullmatch(key) or not 0 <= int(key) < vocab:
                raise bad(f"logit_bias: {key[:32]!r} is not a token id of this model (0 to {vocab - 1})",
                          "logit_bias")
            parsed[int(key)] = value
        return parsed

    def max_tokens(self, requested: int | None, prompt: list[int]) -> int:
        # OpenAI's default: as many as the model has room for after the prompt.
        return requested if requested is not None else max(1, self.generation.max_model_len - len(prompt))

    def sampling(self, request: Any, max_tokens: int, **only: Any) -> Sampling:
        """The sampling fields both OpenAI requests share (vLLM's extras included), OpenAI's and vLLM's defaults for
        those left out, and ``only`` theirs."""
        refuse_unserved(request)
        if request.prompt_logprobs is not None and request.stream and request.prompt_logprobs != 0:
            raise bad("prompt_logprobs are not available with stream: true", "prompt_logprobs")
        return Sampling(
            max_tokens=max_tokens,
            **common_sampling(request),
            n=request.n or 1,
            logit_bias=self.logit_bias(request.logit_bias),
            min_tokens=request.min_tokens or 0,
            ignore_eos=bool(request.ignore_eos),
            stop_token_ids=list(request.stop_token_ids or ()),
            include_stop_str_in_output=bool(request.include_stop_str_in_output),
            skip_special_tokens=request.skip_special_tokens is not False,
            spaces_between_special_tokens=request.spaces_between_special_tokens is not False,
            prompt_logprobs=request.prompt_logprobs,
            bad_words=list(request.bad_words or ()),
            allowed_token_ids=list(request.allowed_token_ids) if request.allowed_token_ids is not None else None,
            **only,
        )


def common_sampling(request: Any) -> dict[str, Any]:
    """The sampling fields every OpenAI request names alike (chat, completions, Responses), with OpenAI's and
    vLLM's defaults for those left out."""
    stop = request.stop
    return dict(
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=-1 if request.top_k is None else request.top_k,
        min_p=request.min_p or 0.0,
        stop=[] if stop is None else [stop] if isinstance(stop, str) else list(stop),
        seed=request.seed,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        repetition_penalty=request.repetition_penalty or 1.0,
    )


def refuse_unserved(request: Any) -> None:
    """vLLM's parameters this runner accepts only at the value that asks for nothing it does not serve."""
    if request.use_beam_search:
        raise bad("use_beam_search: beam search is not served here", "use_beam_search")
    if request.priority:
        raise bad("priority: this runner schedules first come, first served (vLLM's default), so only 0 is "
                  "accepted", "priority")


def structured_outputs(request: Any, schema: dict | None = None, json_object: bool = False) -> dict[str, Any]:
    """The request's structured-outputs constraint as Sampling fields: ``schema``/``json_object`` (from a tool plan
    or response_format) or vLLM's ``structured_outputs``, one constraint at most."""
    fields: dict[str, Any] = {}
    given = request.structured_outputs
    if given is not None:
        constraints = {name: value for name, value in (
            ("json", given.json_), ("regex", given.regex), ("choice", given.choice), ("grammar", given.grammar),
            ("json_object", given.json_object or None), ("structural_tag", given.structural_tag))
            if value is not None}
        if len(constraints) > 1:
            raise bad(f"structured_outputs: one constraint at a time, not {' and '.join(constraints)}",
                      "structured_outputs")
        if constraints and (schema is not None or json_object):
            raise bad("structured_outputs and response_format (or forced tool calls) both constrain the answer: "
                      "ask for one", "structured_outputs")
        for name, value in constraints.items():
            if name in ("json", "structural_tag") and isinstance(value, str):
                value = json_document(value, f"structured_outputs.{name}", f"structured_outputs.{name}")
            if name in ("json", "structural_tag"):
                check_schemas([value], f"structured_outputs.{name}", f"structured_outputs.{name}")
            fields["json_schema" if name == "json" else name] = value
        fields.update(disable_any_whitespace=bool(given.disable_any_whitespace),
                      disable_additional_properties=bool(given.disable_additional_properties),
                      whitespace_pattern=given.whitespace_pattern)
    if schema is not None:
        check_schemas([schema], "the JSON schema of response_format", "response_format")
        fields["json_schema"] = schema
    if json_object:
        fields["json_object"] = True
    return fields


def response_format_constraint(response_format: Any) -> tuple[dict | None, bool]:
    """A response_format as (JSON schema, JSON object wanted)."""
    if response_format is None or response_format.type == "text":
        return None, False
    if response_format.type == "json_schema":
        if response_format.json_schema is None or response_format.json_schema.schema_ is None:
            raise bad("response_format json_schema needs json_schema.schema", "response_format")
        return response_format.json_schema.schema_, False
    return None, True


def prompt_logprobs_json(entries: PromptLogprobs | None) -> list[dict[str, PromptLogprob] | None] | None:
    """vLLM's prompt_logprobs in a response: per prompt token, each candidate by its token id."""
    if entries is None:
        return None
    return [None if entry is None else {str(token_id): PromptLogprob(logprob=logprob, rank=rank, decoded_token=text)
                                        for token_id, (logprob, rank, text) in entry.items()}
            for entry in entries]


def chat_turns(messages: list[Any]) -> list[dict]:
    """OpenAI chat messages as the template's turns (text parts only)."""
    require_turns(messages)
    turns = []
    for index, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            texts = []
            for part_index, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise bad(
                        f"content parts of type {part.type!r} are not supported: this model reads text parts only",
                        f"messages.[{index}].content.[{part_index}].type",
                    )
                texts.append(part.text)
            content = "\n".join(texts)
        calls = [(call.id, call.function.name, call.function.arguments) for call in message.tool_calls or ()]
        turns.append(turn(index, message.role, content, tool_call_id=message.tool_call_id, name=message.name,
                          tool_calls=calls))
    return turns


def generation_prompt(request) -> bool:
    """add_generation_prompt: true unless set false, or left out when the last message is continued."""
    if request.add_generation_prompt is not None:
        return request.add_generation_prompt
    return not request.continue_final_message
