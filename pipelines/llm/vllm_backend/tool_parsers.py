"""vLLM's tool-call parsers, behind the pipeline's ``ToolCallParser`` protocol."""

from __future__ import annotations

from collections.abc import Sequence

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.tool_parsers import ToolParserManager

from pipelines.llm.engine import CallPiece


def tool_parser_names() -> list[str]:
    return sorted(ToolParserManager.list_registered())


class ToolCallStream:
    """One answer read by a vLLM tool parser's streaming mode, piece by piece (the parser keeps state)."""

    def __init__(self, parser, request: ChatCompletionRequest) -> None:
        self.parser = parser
        self.request = request
        self.text = ""
        self.token_ids: list[int] = []

    def feed(self, text: str, token_ids: Sequence[int] | None) -> tuple[str, list[CallPiece]]:
        if token_ids is None:  # a piece cut out of a step (after a model's thinking): its tokens, as encoded
            token_ids = self.parser.model_tokenizer.encode(text, add_special_tokens=False)
        delta_ids = list(token_ids)
        previous_text, previous_ids = self.text, self.token_ids
        self.text, self.token_ids = previous_text + text, previous_ids + delta_ids
        delta = self.parser.extract_tool_calls_streaming(
            previous_text, self.text, text, previous_ids, self.token_ids, delta_ids, self.request)
        if delta is None:
            return "", []
        pieces = [(call.index, call.function.name if call.function else None,
                   call.function.arguments if call.function else None) for call in delta.tool_calls]
        return delta.content or "", pieces

    def finish(self) -> list[CallPiece]:
        # As vLLM's server ends a stream: the parsed arguments of the last call that were not streamed yet.
        rest = self.parser.get_remaining_unstreamed_args() if self.parser.prev_tool_call_arr else ""
        return [(len(self.parser.prev_tool_call_arr) - 1, None, rest)] if rest else []


class ToolCallParser:
    """One of vLLM's tool-call parsers, reading tool calls out of a model's answer."""

    def __init__(self, name: str, tokenizer) -> None:
        self.name = name
        self.parser_class = ToolParserManager.get_tool_parser(name)
        self.tokenizer = tokenizer

    def extract(self, text: str, request: dict) -> tuple[str | None, list[tuple[str, str]]]:
        """The answer's content and its tool calls as (name, arguments JSON); ``request`` is the OpenAI body."""
        vllm_request = ChatCompletionRequest.model_validate(request)
        parser = self.parser_class(self.tokenizer, vllm_request.tools)
        found = parser.extract_tool_calls(text, vllm_request)
        if not found.tools_called:
            return text, []
        return found.content, [(call.function.name, call.function.arguments) for call in found.tool_calls]

    def stream(self, request: dict) -> ToolCallStream:
        vllm_request = ChatCompletionRequest.model_validate(request)
        return ToolCallStream(self.parser_class(self.tokenizer, vllm_request.tools), vllm_request)
