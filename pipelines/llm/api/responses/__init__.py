"""``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{response_id}``: OpenAI's Responses API.

Answers are JSON or SSE events. The input items become the chat template's turns (``conversation.turn``), the
function tools and tool choice an OpenAI-style tool plan (``tools.plan_tools``),
and the answer is read by the shared ``AnswerReader``: its events (text,
thinking, a call's start, a piece of its arguments) are written here as output
items and Responses stream events, so whatever the reader streams, this API
streams. Finished responses are kept in a bounded store of this process
(RESPONSES_STORE_SIZE responses, RESPONSES_STORE_BYTES bytes) for ``GET`` and
``previous_response_id``, until ``DELETE`` removes them.

The package is laid out as vLLM's ``entrypoints/openai/responses/``:
``conversation`` (the input items as the chat template's turns; vLLM's
``context``), ``store`` (the finished responses kept, and their settings),
``output`` (the output items and the stream events that build them; vLLM's
``streaming_events``) and ``serving`` (the request's checks, the answer and the
operations). The request and response models are generated from openapi.yaml
into ``pipelines.llm.schema`` (vLLM's ``protocol``).
"""

from pipelines.llm.api.responses.output import Output
from pipelines.llm.api.responses.serving import ResponsesAPI
from pipelines.llm.api.responses.store import ResponsesSettings, ResponseStore

__all__ = ["Output", "ResponseStore", "ResponsesAPI", "ResponsesSettings"]

ResponsesAPI.__module__ = __name__  # its public home, where the entry point names it (and the pipeline's describe())
