"""The tools the API tests offer a model, one weather tool in each API's shape."""

from __future__ import annotations

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
# get_weather(city), as each API declares a function tool
CHAT_WEATHER = {"type": "function",
                "function": {"name": "get_weather", "description": "The weather in a city", "parameters": CITY}}
RESPONSES_WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
                     "parameters": CITY}
ANTHROPIC_WEATHER = {"name": "get_weather", "description": "The weather in a city", "input_schema": CITY}
