# Generated from openapi.yaml by `make gen` (python -m runner.codegen). Do not edit.
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from runner.jsontypes import Integer
from runner.operations import Operation
from runner.schema import APIErrorMessage


class LLMMessage(BaseModel):
    role: str
    content: str


class LLMRequest(BaseModel):
    messages: list[LLMMessage]
    model: str = ''
    temperature: float = Field(default=0.7, ge=0)
    max_tokens: Integer = Field(default=256, ge=1)
    top_p: float = Field(default=1.0, le=1, gt=0)
    top_k: Integer = Field(default=-1, ge=-1)
    stream: bool = False


class LLMTokenUsage(BaseModel):
    prompt_tokens: Integer
    completion_tokens: Integer
    total_tokens: Integer


class LLMChoice(BaseModel):
    index: Integer
    finish_reason: str = ''
    delta: LLMMessage | None = None
    message: LLMMessage | None = None


class LLMResponse(BaseModel):
    id: str
    model: str
    created: Integer
    usage: LLMTokenUsage
    choices: list[LLMChoice]
    error: APIErrorMessage | None = None


class ChatContentPart(BaseModel):
    "One part of a message's content; only text parts are served."

    type: str
    text: str | None = None


class ChatToolCallFunction(BaseModel):
    name: str
    arguments: str


class ChatToolCall(BaseModel):
    id: str
    type: Literal['function']
    function: ChatToolCallFunction


class ChatMessage(BaseModel):
    "One message of the conversation, as OpenAI's SDKs send it."

    role: Literal['system', 'developer', 'user', 'assistant', 'tool']
    content: str | list[ChatContentPart] | None = None
    name: str | None = None
    tool_calls: list[ChatToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(BaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(BaseModel):
    type: Literal['function']
    function: FunctionDefinition


class NamedToolChoiceFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal['function']
    function: NamedToolChoiceFunction


class JSONSchemaFormat(BaseModel):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias='schema')
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal['text', 'json_object', 'json_schema']
    json_schema: JSONSchemaFormat | None = None


class StreamOptions(BaseModel):
    include_usage: bool | None = None


class StructuredOutputs(BaseModel):
    "vLLM's structured outputs: one constraint (json, regex, choice, grammar, json_object or structural_tag) and how JSON treats whitespace."

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(default=None, alias='json')
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool | None = None
    disable_additional_properties: bool | None = None
    whitespace_pattern: str | None = None


class ChatCompletionRequest(BaseModel):
    "OpenAI's chat completion request; an unknown field is a 400, as OpenAI answers it."

    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[ChatMessage]
    max_tokens: Annotated[Integer, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[Integer, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[Integer, Field(ge=1, le=16)] | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: Integer | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[Integer, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal['none', 'auto', 'required'] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: Annotated[Integer, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(le=2, gt=0)] | None = None
    reasoning_effort: Literal['none', 'minimal', 'low', 'medium', 'high', 'xhigh', 'max'] | None = None
    include_reasoning: bool | None = None
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    stop_token_ids: list[Annotated[Integer, Field(ge=0)]] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    min_tokens: Annotated[Integer, Field(ge=0)] | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    truncate_prompt_tokens: Annotated[Integer, Field(ge=-1)] | None = None
    truncation_side: Literal['left', 'right'] | None = None
    prompt_logprobs: Annotated[Integer, Field(ge=-1)] | None = None
    allowed_token_ids: list[Annotated[Integer, Field(ge=0)]] | None = None
    bad_words: list[str] | None = None
    echo: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    add_special_tokens: bool | None = None
    documents: list[dict[str, str]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    structured_outputs: StructuredOutputs | None = None
    priority: Integer | None = None


class CompletionRequest(BaseModel):
    "OpenAI's (legacy) completion request; an unknown field is a 400."

    model_config = ConfigDict(extra="forbid")

    model: str
    prompt: str | Annotated[list[str], Field(min_length=1)]
    max_tokens: Annotated[Integer, Field(ge=1)] | None = 16
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[Integer, Field(ge=1, le=16)] | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: Integer | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    logprobs: Annotated[Integer, Field(ge=0, le=5)] | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: Annotated[Integer, Field(ge=1)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: Annotated[Integer, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(le=2, gt=0)] | None = None
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    stop_token_ids: list[Annotated[Integer, Field(ge=0)]] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    min_tokens: Annotated[Integer, Field(ge=0)] | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    truncate_prompt_tokens: Annotated[Integer, Field(ge=-1)] | None = None
    truncation_side: Literal['left', 'right'] | None = None
    prompt_logprobs: Annotated[Integer, Field(ge=-1)] | None = None
    allowed_token_ids: list[Annotated[Integer, Field(ge=0)]] | None = None
    bad_words: list[str] | None = None
    add_special_tokens: bool | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    priority: Integer | None = None


class CompletionUsage(BaseModel):
    prompt_tokens: Integer
    completion_tokens: Integer
    total_tokens: Integer


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[Integer]


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[Integer]
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal['assistant']
    content: str | None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ChatToolCall] | None = None


class ChatCompletionChoice(BaseModel):
    index: Integer
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal['stop', 'length', 'tool_calls']


class PromptLogprob(BaseModel):
    "One candidate for a prompt token, keyed by its token id (vLLM's Logprob)."

    logprob: float
    rank: Integer | None
    decoded_token: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal['chat.completion']
    created: Integer
    model: str
    choices: list[ChatCompletionChoice]
    usage: CompletionUsage
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


class ChunkToolCallFunction(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ChunkToolCall(BaseModel):
    index: Integer
    id: str | None = None
    type: Literal['function'] | None = None
    function: ChunkToolCallFunction | None = None


class ChunkDelta(BaseModel):
    role: Literal['assistant'] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ChunkToolCall] | None = None


class ChunkChoice(BaseModel):
    index: Integer
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal['stop', 'length', 'tool_calls'] | None


class ChatCompletionChunk(BaseModel):
    'One event of a streamed chat completion. The first chunk of each choice carries the role; the last its finish_reason; with `stream_options.include_usage` every chunk has `usage: null` and one last chunk with no choices has the usage.'

    id: str
    object: Literal['chat.completion.chunk']
    created: Integer
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[Integer]


class CompletionChoice(BaseModel):
    index: Integer
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal['stop', 'length'] | None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


class Completion(BaseModel):
    id: str
    object: Literal['text_completion']
    created: Integer
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class Model(BaseModel):
    id: str
    object: Literal['model']
    created: Integer
    owned_by: str
    max_model_len: Integer | None = None


class ModelList(BaseModel):
    object: Literal['list']
    data: list[Model]


class TokenizeRequest(BaseModel):
    "vLLM's tokenize request: `prompt` (a raw text) or `messages` (a chat, rendered by the model's template), not both."

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    return_token_strs: bool | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ChatTool] | None = None


class TokenizeResponse(BaseModel):
    count: Integer
    max_model_len: Integer
    tokens: list[Integer]
    token_strs: list[str] | None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[Annotated[Integer, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        operation_id='genLLM',
        method='POST',
        path='/llm',
        request_model=LLMRequest,
        authenticated=True,
        error_shape='livepeer',
    ),
    Operation(
        operation_id='createChatCompletion',
        method='POST',
        path='/v1/chat/completions',
        request_model=ChatCompletionRequest,
        authenticated=True,
        error_shape='openai',
    ),
    Operation(
        operation_id='createCompletion',
        method='POST',
        path='/v1/completions',
        request_model=CompletionRequest,
        authenticated=True,
        error_shape='openai',
    ),
    Operation(
        operation_id='listModels',
        method='GET',
        path='/v1/models',
        request_model=None,
        authenticated=True,
        error_shape='openai',
    ),
    Operation(
        operation_id='retrieveModel',
        method='GET',
        path='/v1/models/{model}',
        request_model=None,
        authenticated=True,
        error_shape='openai',
    ),
    Operation(
        operation_id='tokenize',
        method='POST',
        path='/tokenize',
        request_model=TokenizeRequest,
        authenticated=True,
        error_shape='openai',
    ),
    Operation(
        operation_id='detokenize',
        method='POST',
        path='/detokenize',
        request_model=DetokenizeRequest,
        authenticated=True,
        error_shape='openai',
    ),
)
