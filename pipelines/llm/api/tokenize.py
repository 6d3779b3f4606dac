"""``POST /tokenize`` and ``POST /detokenize``: vLLM's tokenizer endpoints, in its shapes.

A ``prompt`` is encoded as /v1/completions encodes it; chat ``messages`` are
rendered by the same chat-template step as /v1/chat/completions (tools as
chat renders them with tool_choice left out, chat_template_kwargs,
add_generation_prompt and continue_final_message included), so the count is
what the engine would be given. Nothing reaches the
engine: only its tokenizer is used.
"""

from __future__ import annotations

from pipelines.llm.api import bad
from pipelines.llm.api.openai_base import OpenAIAPI
from pipelines.llm.schema import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from runner.pipeline import RequestContext


class TokenizeAPI(OpenAIAPI):
    SERVES = {"tokenize": "tokenize", "detokenize": "detokenize"}

    async def tokenize(self, request: TokenizeRequest, context: RequestContext) -> TokenizeResponse:
        self.served(request.model, blank_is_base=True)  # vLLM's: none given is the base model
        generation = self.generation
        if (request.prompt is None) == (request.messages is None):
            raise bad("give either prompt (a text) or messages (a chat), not both or neither",
                      "messages" if request.messages is not None else "prompt")
        if request.chat_template is not None:
            raise bad("chat_template: this runner renders the model's own chat template only", "chat_template")
        if request.prompt is not None:
            chat_only = [name for name in ("add_generation_prompt", "continue_final_message", "chat_template_kwargs",
                                           "tools") if getattr(request, name) is not None]
            if chat_only:
                raise bad(f"{chat_only[0]} applies to messages, not to a prompt", chat_only[0])
            tokens = await generation.encode(request.prompt, add_special_tokens=request.add_special_tokens is not False)
        else:  # as chat completions render the messages and tools, with tool_choice left out
            tokens, _, _ = await self.openai_chat_prompt(request, chat_template_kwargs=request.chat_template_kwargs)
        return TokenizeResponse(
            count=len(tokens), max_model_len=generation.max_model_len, tokens=tokens,
            token_strs=await generation.token_strings(tokens) if request.return_token_strs else None,
        )

    async def detokenize(self, request: DetokenizeRequest, context: RequestContext) -> DetokenizeResponse:
        self.served(request.model, blank_is_base=True)  # vLLM's: none given is the base model
        vocab = self.generation.vocab_size
        unknown = [token for token in request.tokens if token >= vocab]
        if unknown:
            raise bad(f"tokens: {unknown[0]} is not a token id of this model (0 to {vocab - 1})", "tokens")
        return DetokenizeResponse(prompt=await self.generation.decode(request.tokens))
