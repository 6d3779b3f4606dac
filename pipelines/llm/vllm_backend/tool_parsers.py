"""vLLM's tool-call parsers, behind the pipeline's ``ToolCallParser`` protocol."""

from __future__ import annotations

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.tool_parsers import ToolParserManager


def tool_parser_names() -> list[str]:
    return sorted(ToolParserManager.list_registered())


class ToolCallParser:
    """One of vLLM's tool-call parsers, reading tool calls out of a model's whole answer."""

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
