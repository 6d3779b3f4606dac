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
    tool_calls: list[ChatToolCall] | None = None


class ChatCompletionChoice(BaseModel):
    index: Integer
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal['stop', 'length', 'tool_calls']


class ChatCompletion(BaseModel):
    id: str
    object: Literal['chat.completion']
    created: Integer
    model: str
    choices: list[ChatCompletionChoice]
    usage: CompletionUsage


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


class AnthropicTextBlock(BaseModel):
    'A text block; `cache_control` and `citations` are accepted and ignored.'

    type: Literal['text']
    text: str
    cache_control: dict[str, Any] | None = None
    citations: list[Any] | None = None


class AnthropicToolResultPart(BaseModel):
    "One part of a tool_result's content; only text parts are served."

    type: str
    text: str | None = None


class AnthropicContentBlock(BaseModel):
    "One block of a message's content. Served: `text`; `tool_use` in an assistant message (`id`, `name`, `input`: a call the model made); `tool_result` in a user message (`tool_use_id`, `content`: a string or text parts; `is_error` accepted); `thinking` and `redacted_thinking` in an assistant message (accepted, left out of the prompt, as chat templates leave out past thinking). Any other type (`image`, `document`, ...) is a 400. `cache_control` is accepted and ignored."

    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[AnthropicToolResultPart] | None = None
    is_error: bool | None = None
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None
    cache_control: dict[str, Any] | None = None
    citations: list[Any] | None = None


class AnthropicMessageParam(BaseModel):
    role: Literal['user', 'assistant', 'system']
    content: str | list[AnthropicContentBlock]


class AnthropicTool(BaseModel):
    "A client tool: its `input_schema` constrains the call's input. `cache_control` and `strict` are accepted (the input always matches the schema here); Anthropic's server tools (`web_search_...`, `bash_...`) are not served."

    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None
    cache_control: dict[str, Any] | None = None
    strict: bool | None = None


class AnthropicToolChoice(BaseModel):
    '`auto` (the model decides), `any` (one or more calls), `tool` (the named one), `none` (no calls; the template is not shown the tools).'

    type: Literal['auto', 'any', 'tool', 'none']
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class AnthropicMessagesRequest(BaseModel):
    "Anthropic's Messages request; an unknown field is a 400 naming it, as Anthropic answers it."

    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[AnthropicMessageParam]
    max_tokens: Integer = Field(ge=1)
    system: str | list[AnthropicTextBlock] | None = None
    stop_sequences: list[str] | None = None
    temperature: Annotated[float, Field(ge=0, le=1)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[Integer, Field(ge=0)] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    metadata: dict[str, Any] | None = None
    cache_control: dict[str, Any] | None = None
    stream: bool | None = None


class AnthropicCountTokensRequest(BaseModel):
    "What a Messages request's prompt is made of; an unknown field is a 400."

    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[AnthropicMessageParam]
    system: str | list[AnthropicTextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    cache_control: dict[str, Any] | None = None


class AnthropicTokensCount(BaseModel):
    input_tokens: Integer


class AnthropicResponseText(BaseModel):
    type: Literal['text']
    text: str


class AnthropicResponseThinking(BaseModel):
    "A reasoning model's thinking; its `signature` is empty (there is nothing to verify here)."

    type: Literal['thinking']
    thinking: str
    signature: str


class AnthropicResponseToolUse(BaseModel):
    type: Literal['tool_use']
    id: str
    name: str
    input: dict[str, Any]


class AnthropicUsage(BaseModel):
    input_tokens: Integer
    output_tokens: Integer


class AnthropicMessage(BaseModel):
    "The assistant's message; in a stream's `message_start` with no content yet and a null stop_reason."

    id: str
    type: Literal['message']
    role: Literal['assistant']
    content: list[AnthropicResponseText | AnthropicResponseThinking | AnthropicResponseToolUse]
    model: str
    stop_reason: Literal['end_turn', 'max_tokens', 'stop_sequence', 'tool_use'] | None
    stop_sequence: str | None
    usage: AnthropicUsage


class AnthropicStreamDelta(BaseModel):
    "A content block's delta (text_delta, input_json_delta, thinking_delta), or message_delta's."

    type: Literal['text_delta', 'input_json_delta', 'thinking_delta'] | None = None
    text: str | None = None
    partial_json: str | None = None
    thinking: str | None = None
    stop_reason: Literal['end_turn', 'max_tokens', 'stop_sequence', 'tool_use'] | None = None
    stop_sequence: str | None = None


class AnthropicStreamEvent(BaseModel):
    'One event of a streamed message (its SSE `event:` line names its `type`).'

    type: Literal['message_start', 'content_block_start', 'content_block_delta', 'content_block_stop', 'message_delta', 'message_stop']
    message: AnthropicMessage | None = None
    index: Integer | None = None
    content_block: AnthropicResponseText | AnthropicResponseThinking | AnthropicResponseToolUse | None = None
    delta: AnthropicStreamDelta | None = None
    usage: AnthropicUsage | None = None


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
        operation_id='createMessage',
        method='POST',
        path='/v1/messages',
        request_model=AnthropicMessagesRequest,
        authenticated=True,
        error_shape='anthropic',
        key_headers=('x-api-key',),
    ),
    Operation(
        operation_id='countMessageTokens',
        method='POST',
        path='/v1/messages/count_tokens',
        request_model=AnthropicCountTokensRequest,
        authenticated=True,
        error_shape='anthropic',
        key_headers=('x-api-key',),
    ),
)
