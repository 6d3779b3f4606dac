"""vLLM's reasoning parsers, behind the pipeline's ``ReasoningParser`` protocol.

vLLM's own serving layer composes a reasoning parser into a ``Parser`` that
follows one answer as it streams (``parse_delta``): it checks whether the
prompt already closed the thinking, and hands the parser each piece with its
token ids. The runner uses that same composition, with no tool parser in it
(tool calls are read after the thinking, by the pipeline's own answer reader).
"""

from __future__ import annotations

from collections.abc import Sequence

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.parser.parser_manager import ParserManager
from vllm.reasoning import ReasoningParserManager

# What vLLM's parse_delta reads of the request here: include_reasoning (on) and tool_choice (no tools).
NO_TOOLS_REQUEST = ChatCompletionRequest.model_validate({"messages": []})


def reasoning_parser_names() -> list[str]:
    return ReasoningParserManager.list_registered()


class ReasoningStream:
    """One answer's thinking and answer, piece by piece."""

    def __init__(self, parser, tokenizer, prompt_token_ids: Sequence[int] | None) -> None:
        self.parser = parser
        self.tokenizer = tokenizer
        self.prompt_token_ids = list(prompt_token_ids) if prompt_token_ids is not None else None
        thinking = parser.reasoning_parser
        vocab = tokenizer.get_vocab()
        self.markers = [(marker, vocab[marker]) for marker in (thinking.reasoning_start_str, thinking.reasoning_end_str)
                        if marker and marker in vocab]

    def feed(self, text: str, token_ids: Sequence[int] | None, finished: bool = False) -> tuple[str, str]:
        if token_ids is None:  # text without its tokens: encoded (markers the detokenizer kept are found again)
            token_ids = self.tokenizer.encode(text, add_special_tokens=False) if text else []
        thought, answer = [], []
        parts = self.split(text, list(token_ids)) or [("", [])]
        for place, (part, part_ids) in enumerate(parts):
            prompt, self.prompt_token_ids = self.prompt_token_ids, None  # read with the first piece only
            delta = self.parser.parse_delta(part, part_ids, NO_TOOLS_REQUEST, prompt,
                                            finished=finished and place == len(parts) - 1)
            if delta is not None:
                thought.append(delta.reasoning or "")
                answer.append(delta.content or "")
        return "".join(thought), "".join(answer)

    def split(self, text: str, token_ids: list[int]) -> list[tuple[str, list[int]]]:
        """A piece of several tokens cut around the thinking's markers, each marker a piece of its own.

        vLLM's parsers see a marker in a piece of several tokens (a stream with
        STREAM_INTERVAL above 1) as thinking text: cut, the answer is the same
        however the engine gathers tokens.
        """
        for marker, marker_id in self.markers:
            at = text.find(marker)
            if at >= 0 and marker_id in token_ids and len(text) > len(marker):
                place = token_ids.index(marker_id)
                return [*self.split(text[:at], token_ids[:place]), (marker, [marker_id]),
                        *self.split(text[at + len(marker):], token_ids[place + 1:])]
        return [(text, token_ids)] if text or token_ids else []


class ReasoningParser:
    """One of vLLM's reasoning parsers for this model's tokenizer."""

    def __init__(self, name: str, tokenizer) -> None:
        self.name = name
        self.tokenizer = tokenizer
        try:
            self.parser_class = ParserManager.get_parser(reasoning_parser_name=name, tokenizer=tokenizer)
        except TypeError as exc:  # the tokenizer lacks the parser's markers, or the name is unknown
            raise ValueError(str(exc)) from None

    def stream(self, prompt_token_ids: Sequence[int] | None) -> ReasoningStream:
        return ReasoningStream(self.parser_class(self.tokenizer), self.tokenizer, prompt_token_ids)
