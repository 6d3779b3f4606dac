"""The tools the API tests offer a model, each in every API's shape: a weather tool, and a note long enough to
make a call of a hundred tokens and more."""

from __future__ import annotations

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
# get_weather(city), as each API declares a function tool
CHAT_WEATHER = {"type": "function",
                "function": {"name": "get_weather", "description": "The weather in a city", "parameters": CITY}}
RESPONSES_WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
                     "parameters": CITY}
ANTHROPIC_WEATHER = {"name": "get_weather", "description": "The weather in a city", "input_schema": CITY}

NOTE_TEXT = {"type": "object", "properties": {"title": {"type": "string"}, "text": {"type": "string"}},
             "required": ["title", "text"]}
# write_note(title, text), asked for with LONG_NOTE_ASK
CHAT_NOTE = {"type": "function",
             "function": {"name": "write_note", "description": "Save a note", "parameters": NOTE_TEXT}}
RESPONSES_NOTE = {"type": "function", "name": "write_note", "description": "Save a note", "parameters": NOTE_TEXT}
ANTHROPIC_NOTE = {"name": "write_note", "description": "Save a note", "input_schema": NOTE_TEXT}
LONG_NOTE_ASK = "Write a long note about the history of Paris, with many details."
