# Generated from openapi.yaml by `make gen` (python -m runner.codegen). Do not edit.
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from runner.jsontypes import Integer
from runner.operations import Operation
from runner.pipeline import APIErrorMessage, OpenAIErrorDetail


class LLMMessage(BaseModel):
    role: str = Field(max_length=64)
    content: str


class LLMRequest(BaseModel):
    messages: list[LLMMessage] = Field(max_length=2048)
    model: str = Field(default='', max_length=256)
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

    type: str = Field(max_length=64)
    text: str | None = None


class ChatToolCallFunction(BaseModel):
    name: str = Field(max_length=64)
    arguments: str


class ChatToolCall(BaseModel):
    id: str = Field(max_length=256)
    type: Literal['function']
    function: ChatToolCallFunction


class ChatMessage(BaseModel):
    "One message of the conversation, as OpenAI's SDKs send it."

    role: Literal['system', 'developer', 'user', 'assistant', 'tool']
    content: str | Annotated[list[ChatContentPart], Field(max_length=256)] | None = None
    name: str | None = Field(default=None, max_length=64)
    tool_calls: list[ChatToolCall] | None = Field(default=None, max_length=128)
    tool_call_id: str | None = Field(default=None, max_length=256)


class FunctionDefinition(BaseModel):
    name: str = Field(max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(BaseModel):
    type: Literal['function']
    function: FunctionDefinition


class NamedToolChoiceFunction(BaseModel):
    name: str = Field(max_length=64)


class NamedToolChoice(BaseModel):
    type: Literal['function']
    function: NamedToolChoiceFunction


class JSONSchemaFormat(BaseModel):
    name: str = Field(max_length=64)
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
    regex: Annotated[str, Field(max_length=16384)] | None = None
    choice: Annotated[list[Annotated[str, Field(max_length=1024)]], Field(min_length=1, max_length=1000)] | None = None
    grammar: Annotated[str, Field(max_length=65536)] | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool | None = None
    disable_additional_properties: bool | None = None
    whitespace_pattern: Annotated[str, Field(max_length=256)] | None = None


class ChatCompletionRequest(BaseModel):
    "OpenAI's chat completion request; an unknown field is a 400, as OpenAI answers it."

    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=256)
    messages: list[ChatMessage] = Field(max_length=2048)
    max_tokens: Annotated[Integer, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[Integer, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[Integer, Field(ge=1, le=16)] | None = None
    stop: Annotated[str, Field(max_length=1024)] | Annotated[list[Annotated[str, Field(max_length=1024)]], Field(max_length=4)] | None = None
    seed: Annotated[Integer, Field(ge=-9223372036854775808, le=9223372036854775807)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: Annotated[dict[Annotated[str, Field(max_length=11)], Annotated[float, Field(ge=-100, le=100)]], Field(max_length=300)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[Integer, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[ChatTool], Field(max_length=128)] | None = None
    tool_choice: Literal['none', 'auto', 'required'] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    top_k: Annotated[Integer, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(le=2, gt=0)] | None = None
    reasoning_effort: Literal['none', 'minimal', 'low', 'medium', 'high', 'xhigh', 'max'] | None = None
    include_reasoning: bool | None = None
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    stop_token_ids: Annotated[list[Annotated[Integer, Field(ge=0)]], Field(max_length=1024)] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    min_tokens: Annotated[Integer, Field(ge=0)] | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    truncate_prompt_tokens: Annotated[Integer, Field(ge=-1)] | None = None
    truncation_side: Literal['left', 'right'] | None = None
    prompt_logprobs: Annotated[Integer, Field(ge=-1)] | None = None
    allowed_token_ids: Annotated[list[Annotated[Integer, Field(ge=0)]], Field(max_length=262144)] | None = None
    bad_words: Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=128)] | None = None
    echo: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    add_special_tokens: bool | None = None
    documents: Annotated[list[Annotated[dict[Annotated[str, Field(max_length=64)], str], Field(max_length=16)]], Field(max_length=128)] | None = None
    chat_template: Annotated[str, Field(max_length=65536)] | None = None
    chat_template_kwargs: Annotated[dict[Annotated[str, Field(max_length=64)], Any], Field(max_length=32)] | None = None
    structured_outputs: StructuredOutputs | None = None
    priority: Integer | None = None


class CompletionRequest(BaseModel):
    "OpenAI's (legacy) completion request; an unknown field is a 400."

    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=256)
    prompt: str | Annotated[list[str], Field(min_length=1)]
    max_tokens: Annotated[Integer, Field(ge=1)] | None = 16
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[Integer, Field(ge=1, le=16)] | None = None
    stop: Annotated[str, Field(max_length=1024)] | Annotated[list[Annotated[str, Field(max_length=1024)]], Field(max_length=4)] | None = None
    seed: Annotated[Integer, Field(ge=-9223372036854775808, le=9223372036854775807)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: Annotated[dict[Annotated[str, Field(max_length=11)], Annotated[float, Field(ge=-100, le=100)]], Field(max_length=300)] | None = None
    logprobs: Annotated[Integer, Field(ge=0, le=5)] | None = None
    echo: bool | None = None
    suffix: Annotated[str, Field(max_length=1024)] | None = None
    best_of: Annotated[Integer, Field(ge=1, le=16)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    top_k: Annotated[Integer, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(le=2, gt=0)] | None = None
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    stop_token_ids: Annotated[list[Annotated[Integer, Field(ge=0)]], Field(max_length=1024)] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    min_tokens: Annotated[Integer, Field(ge=0)] | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    truncate_prompt_tokens: Annotated[Integer, Field(ge=-1)] | None = None
    truncation_side: Literal['left', 'right'] | None = None
    prompt_logprobs: Annotated[Integer, Field(ge=-1)] | None = None
    allowed_token_ids: Annotated[list[Annotated[Integer, Field(ge=0)]], Field(max_length=262144)] | None = None
    bad_words: Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=128)] | None = None
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
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal['list']
    data: list[Model]


class ResponsesContentPart(BaseModel):
    "One part of an item's content. Text parts (`input_text`, `output_text`, `text`) and a reasoning item's `reasoning_text` are read; any other type (an image, a file, audio, a refusal) is a 400 naming it."

    type: str = Field(max_length=64)
    text: str | None = None


class ResponsesInputItem(BaseModel):
    'One item of `input`: a message (`type` "message", the default when a `role` is given), a `function_call` the model made (`call_id`, `name`, `arguments`), a `function_call_output` (`call_id`, `output`), or a `reasoning` item (accepted and not shown to the model again, as the templates of reasoning models drop earlier thinking). Other fields of an item (ids, status, annotations) are accepted and ignored.'

    type: str | None = Field(default=None, max_length=64)
    role: Literal['user', 'assistant', 'system', 'developer'] | None = None
    content: str | Annotated[list[ResponsesContentPart], Field(max_length=256)] | None = None
    call_id: str | None = Field(default=None, max_length=256)
    name: str | None = Field(default=None, max_length=64)
    arguments: str | None = None
    output: str | Annotated[list[ResponsesContentPart], Field(max_length=256)] | None = None
    id: Annotated[str, Field(max_length=256)] | None = None
    status: Annotated[str, Field(max_length=64)] | None = None


class ResponsesTool(BaseModel):
    'A tool the model may call; only `type` "function" is served (built-in tools are a 400).'

    type: str = Field(max_length=64)
    name: str | None = Field(default=None, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesToolChoice(BaseModel):
    'A named tool choice; only `type` "function" with its `name` is served.'

    type: str = Field(max_length=64)
    name: str | None = Field(default=None, max_length=64)


class ResponsesTextFormat(BaseModel):
    type: Literal['text', 'json_object', 'json_schema']
    name: str | None = Field(default=None, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias='schema')
    strict: bool | None = None


class ResponsesTextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: ResponsesTextFormat | None = None
    verbosity: Literal['low', 'medium', 'high'] | None = None


class ResponsesReasoningConfig(BaseModel):
    'Accepted when every field is null; a reasoning effort or summary is not served (400).'

    effort: Annotated[str, Field(max_length=64)] | None = None
    summary: Annotated[str, Field(max_length=64)] | None = None
    generate_summary: Annotated[str, Field(max_length=64)] | None = None


class ResponsesStreamOptions(BaseModel):
    include_obfuscation: bool | None = None


class ResponsesRequest(BaseModel):
    "OpenAI's Responses API request. An unknown field is a 400, as OpenAI answers it; the fields documented as not served are a 400 naming them when set to anything but their default."

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(max_length=256)] | None = None
    input: str | Annotated[list[ResponsesInputItem], Field(max_length=2048)] | None = None
    instructions: str | None = None
    max_output_tokens: Annotated[Integer, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    tools: Annotated[list[ResponsesTool], Field(max_length=128)] | None = None
    tool_choice: Literal['none', 'auto', 'required'] | ResponsesToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: ResponsesTextConfig | None = None
    stream: bool | None = None
    stream_options: ResponsesStreamOptions | None = None
    store: bool | None = None
    previous_response_id: Annotated[str, Field(max_length=256)] | None = None
    metadata: Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    safety_identifier: Annotated[str, Field(max_length=256)] | None = None
    prompt_cache_key: Annotated[str, Field(max_length=256)] | None = None
    prompt_cache_retention: Annotated[str, Field(max_length=64)] | None = None
    service_tier: Annotated[str, Field(max_length=64)] | None = None
    truncation: Literal['auto', 'disabled'] | None = None
    background: bool | None = None
    include: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=16)] | None = None
    reasoning: ResponsesReasoningConfig | None = None
    max_tool_calls: Annotated[Integer, Field(ge=1)] | None = None
    top_logprobs: Annotated[Integer, Field(ge=0, le=20)] | None = None
    conversation: Any | None = None
    prompt: Any | None = None
    top_k: Annotated[Integer, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(le=2, gt=0)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    seed: Annotated[Integer, Field(ge=-9223372036854775808, le=9223372036854775807)] | None = None
    stop: Annotated[str, Field(max_length=1024)] | Annotated[list[Annotated[str, Field(max_length=1024)]], Field(max_length=4)] | None = None


class ResponsesOutputText(BaseModel):
    type: Literal['output_text']
    text: str
    annotations: list[Any]
    logprobs: list[Any] | None = None


class ResponsesOutputMessage(BaseModel):
    id: str
    type: Literal['message']
    role: Literal['assistant']
    status: Literal['in_progress', 'completed', 'incomplete']
    content: list[ResponsesOutputText]


class ResponsesFunctionCall(BaseModel):
    id: str
    type: Literal['function_call']
    call_id: str
    name: str
    arguments: str
    status: Literal['in_progress', 'completed', 'incomplete']


class ResponsesReasoningText(BaseModel):
    type: Literal['reasoning_text']
    text: str


class ResponsesReasoningItem(BaseModel):
    id: str
    type: Literal['reasoning']
    summary: list[Any]
    content: list[ResponsesReasoningText] | None = None
    status: Literal['in_progress', 'completed', 'incomplete']


class ResponsesInputTokensDetails(BaseModel):
    cached_tokens: Integer
    cache_write_tokens: Integer


class ResponsesOutputTokensDetails(BaseModel):
    reasoning_tokens: Integer


class ResponsesUsage(BaseModel):
    input_tokens: Integer
    input_tokens_details: ResponsesInputTokensDetails
    output_tokens: Integer
    output_tokens_details: ResponsesOutputTokensDetails
    total_tokens: Integer


class ResponsesError(BaseModel):
    code: str
    message: str


class ResponsesIncompleteDetails(BaseModel):
    reason: Literal['max_output_tokens']


class ResponsesResponse(BaseModel):
    "OpenAI's response object. `status` is completed, or incomplete (with `incomplete_details`) when the answer reached max_output_tokens; in_progress in a stream's first events and failed in its `response.failed` ending."

    id: str
    object: Literal['response']
    created_at: Integer
    status: Literal['completed', 'incomplete', 'in_progress', 'failed']
    error: ResponsesError | None
    incomplete_details: ResponsesIncompleteDetails | None
    model: str
    output: list[ResponsesOutputMessage | ResponsesFunctionCall | ResponsesReasoningItem]
    instructions: str | None
    metadata: dict[str, str] | None
    parallel_tool_calls: bool
    temperature: float | None
    top_p: float | None
    tool_choice: Literal['none', 'auto', 'required'] | ResponsesToolChoice
    tools: list[ResponsesTool]
    max_output_tokens: Integer | None
    previous_response_id: str | None
    text: ResponsesTextConfig
    store: bool
    background: bool
    truncation: Literal['disabled']
    usage: ResponsesUsage | None


class ResponsesStreamEvent(BaseModel):
    "One event of a streamed response, as OpenAI's SDKs read them: its `type`, its `sequence_number` (0, 1, 2, ... in the order sent), and the fields of that type. `response.failed` also carries `error` (OpenAI's error object), which the SDKs raise."

    type: Literal['response.created', 'response.in_progress', 'response.output_item.added', 'response.content_part.added', 'response.output_text.delta', 'response.output_text.done', 'response.reasoning_text.delta', 'response.reasoning_text.done', 'response.function_call_arguments.delta', 'response.function_call_arguments.done', 'response.content_part.done', 'response.output_item.done', 'response.completed', 'response.incomplete', 'response.failed']
    sequence_number: Integer = Field(ge=0)
    response: ResponsesResponse | None = None
    output_index: Integer | None = None
    content_index: Integer | None = None
    item_id: str | None = None
    item: ResponsesOutputMessage | ResponsesFunctionCall | ResponsesReasoningItem | None = None
    part: ResponsesOutputText | ResponsesReasoningText | None = None
    delta: str | None = None
    text: str | None = None
    arguments: str | None = None
    name: str | None = None
    logprobs: list[Any] | None = None
    error: OpenAIErrorDetail | None = None


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str = Field(max_length=256)
    lora_path: str = Field(max_length=4096)
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str = Field(max_length=256)
    lora_int_id: Integer | None = None


class ResponsesDeleted(BaseModel):
    "OpenAI's answer to a deleted response."

    id: str
    object: Literal['response']
    deleted: Literal[True]


class LoRAAdapterStatus(BaseModel):
    lora_name: str
    status: Literal['loaded', 'unloaded']
    message: str


class TokenizeRequest(BaseModel):
    "vLLM's tokenize request: `prompt` (a raw text) or `messages` (a chat, rendered by the model's template), not both."

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(max_length=256)] | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, max_length=2048)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    return_token_strs: bool | None = None
    chat_template: Annotated[str, Field(max_length=65536)] | None = None
    chat_template_kwargs: Annotated[dict[Annotated[str, Field(max_length=64)], Any], Field(max_length=32)] | None = None
    tools: Annotated[list[ChatTool], Field(max_length=128)] | None = None


class TokenizeResponse(BaseModel):
    count: Integer
    max_model_len: Integer
    tokens: list[Integer]
    token_strs: list[str] | None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(max_length=256)] | None = None
    tokens: list[Annotated[Integer, Field(ge=0)]] = Field(max_length=262144)


class DetokenizeResponse(BaseModel):
    prompt: str


class AnthropicTextBlock(BaseModel):
    'A text block; `cache_control` and `citations` are accepted and ignored.'

    type: Literal['text']
    text: str
    cache_control: Annotated[dict[str, Any], Field(max_length=8)] | None = None
    citations: Annotated[list[Any], Field(max_length=256)] | None = None


class AnthropicToolResultPart(BaseModel):
    "One part of a tool_result's content; only text parts are served."

    type: str = Field(max_length=64)
    text: str | None = None


class AnthropicContentBlock(BaseModel):
    "One block of a message's content. Served: `text`; `tool_use` in an assistant message (`id`, `name`, `input`: a call the model made); `tool_result` in a user message (`tool_use_id`, `content`: a string or text parts; `is_error` accepted); `thinking` and `redacted_thinking` in an assistant message (accepted, left out of the prompt, as chat templates leave out past thinking). Any other type (`image`, `document`, ...) is a 400. `cache_control` is accepted and ignored."

    type: str = Field(max_length=64)
    text: str | None = None
    id: Annotated[str, Field(max_length=256)] | None = None
    name: Annotated[str, Field(max_length=128)] | None = None
    input: dict[str, Any] | None = None
    tool_use_id: Annotated[str, Field(max_length=256)] | None = None
    content: str | Annotated[list[AnthropicToolResultPart], Field(max_length=256)] | None = None
    is_error: bool | None = None
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None
    cache_control: Annotated[dict[str, Any], Field(max_length=8)] | None = None
    citations: Annotated[list[Any], Field(max_length=256)] | None = None


class AnthropicMessageParam(BaseModel):
    role: Literal['user', 'assistant', 'system']
    content: str | Annotated[list[AnthropicContentBlock], Field(max_length=256)]


class AnthropicTool(BaseModel):
    "A client tool: its `input_schema` constrains the call's input. `cache_control` and `strict` are accepted (the input always matches the schema here); Anthropic's server tools (`web_search_...`, `bash_...`) are not served."

    name: str = Field(max_length=128)
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: Annotated[str, Field(max_length=64)] | None = None
    cache_control: Annotated[dict[str, Any], Field(max_length=8)] | None = None
    strict: bool | None = None


class AnthropicToolChoice(BaseModel):
    '`auto` (the model decides), `any` (one or more calls), `tool` (the named one), `none` (no calls; the template is not shown the tools).'

    type: Literal['auto', 'any', 'tool', 'none']
    name: Annotated[str, Field(max_length=128)] | None = None
    disable_parallel_tool_use: bool | None = None


class AnthropicMessagesRequest(BaseModel):
    "Anthropic's Messages request; an unknown field is a 400 naming it, as Anthropic answers it."

    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=256)
    messages: list[AnthropicMessageParam] = Field(max_length=2048)
    max_tokens: Integer = Field(ge=1)
    system: str | Annotated[list[AnthropicTextBlock], Field(max_length=256)] | None = None
    stop_sequences: Annotated[list[Annotated[str, Field(max_length=1024)]], Field(max_length=4)] | None = None
    temperature: Annotated[float, Field(ge=0, le=1)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[Integer, Field(ge=0)] | None = None
    tools: Annotated[list[AnthropicTool], Field(max_length=128)] | None = None
    tool_choice: AnthropicToolChoice | None = None
    metadata: Annotated[dict[Annotated[str, Field(max_length=64)], Any], Field(max_length=16)] | None = None
    cache_control: Annotated[dict[str, Any], Field(max_length=8)] | None = None
    stream: bool | None = None


class AnthropicCountTokensRequest(BaseModel):
    "What a Messages request's prompt is made of; an unknown field is a 400."

    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=256)
    messages: list[AnthropicMessageParam] = Field(max_length=2048)
    system: str | Annotated[list[AnthropicTextBlock], Field(max_length=256)] | None = None
    tools: Annotated[list[AnthropicTool], Field(max_length=128)] | None = None
    tool_choice: AnthropicToolChoice | None = None
    cache_control: Annotated[dict[str, Any], Field(max_length=8)] | None = None


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
        operation_id='createResponse',
        method='POST',
        path='/v1/responses',
        request_model=ResponsesRequest,
        authenticated=True,
        error_shape='openai',
    ),
    Operation(
        operation_id='retrieveResponse',
        method='GET',
        path='/v1/responses/{response_id}',
        request_model=None,
        authenticated=True,
        error_shape='openai',
    ),
    Operation(
        operation_id='deleteResponse',
        method='DELETE',
        path='/v1/responses/{response_id}',
        request_model=None,
        authenticated=True,
        error_shape='openai',
    ),
    Operation(
        operation_id='loadLoRAAdapter',
        method='POST',
        path='/v1/load_lora_adapter',
        request_model=LoadLoRAAdapterRequest,
        authenticated=True,
        error_shape='openai',
    ),
    Operation(
        operation_id='unloadLoRAAdapter',
        method='POST',
        path='/v1/unload_lora_adapter',
        request_model=UnloadLoRAAdapterRequest,
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
