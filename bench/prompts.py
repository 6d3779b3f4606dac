"""The fixed workload: varied chat prompts, each asking for more than 128 tokens of text.

Every system gets the same requests in the same order, at temperature 0.
"""

from __future__ import annotations

SYSTEM_HELPFUL = "You are a helpful assistant."
SYSTEM_TEACHER = "You are a patient teacher who explains things step by step."
SYSTEM_WRITER = "You are a creative writer."

USER_PROMPTS: list[tuple[str | None, str]] = [
    (None, "Explain how a refrigerator keeps food cold."),
    (None, "Write a short story about a lighthouse keeper who finds a message in a bottle."),
    (SYSTEM_HELPFUL, "What are the main differences between TCP and UDP?"),
    (SYSTEM_TEACHER, "How does photosynthesis work?"),
    (None, "Give me five tips for learning a new language, with a sentence on each."),
    (SYSTEM_WRITER, "Describe a busy market in a coastal town at sunrise."),
    (None, "What causes the seasons on Earth?"),
    (SYSTEM_HELPFUL, "Write a polite email asking a colleague to review a document by Friday."),
    (None, "Explain what a hash table is and why lookups are fast."),
    (SYSTEM_TEACHER, "Why is the sky blue?"),
    (None, "List the planets of the solar system and say one thing about each."),
    (SYSTEM_WRITER, "Write a poem about autumn leaves."),
    (None, "How do vaccines train the immune system?"),
    (SYSTEM_HELPFUL, "Plan a three-day trip to Rome for someone who loves history."),
    (None, "What is the difference between weather and climate?"),
    (SYSTEM_TEACHER, "Explain fractions to a ten-year-old."),
    (None, "Describe how to bake a loaf of bread at home."),
    (SYSTEM_WRITER, "Tell a fable about a fox and a crow, with a moral at the end."),
    (None, "What are the benefits of regular exercise?"),
    (SYSTEM_HELPFUL, "Compare electric cars and petrol cars for a daily commute."),
    (None, "Explain how the internet gets a web page to your computer."),
    (SYSTEM_TEACHER, "What is gravity and how did Newton describe it?"),
    (None, "Write a product description for a waterproof hiking backpack."),
    (SYSTEM_WRITER, "Write the opening paragraph of a mystery novel set in a snowy village."),
    (None, "How does a bill become a law in a parliamentary democracy?"),
    (SYSTEM_HELPFUL, "Suggest a weekly meal plan for a vegetarian on a budget."),
    (None, "What were the main causes of the Industrial Revolution?"),
    (SYSTEM_TEACHER, "Explain the water cycle."),
    (None, "Describe the rules of chess for a complete beginner."),
    (SYSTEM_WRITER, "Write a letter from a sailor to his family, far out at sea."),
    (None, "Why do we need sleep, and what happens when we do not get enough?"),
    (SYSTEM_HELPFUL, "Explain the pros and cons of working from home."),
    (None, "How do bees make honey?"),
    (SYSTEM_TEACHER, "What is a prime number? Give examples and explain why they matter."),
    (None, "Describe the life cycle of a star like the Sun."),
    (SYSTEM_WRITER, "Write a dialogue between a robot and a child who meet for the first time."),
]


def chat_prompts() -> list[list[dict[str, str]]]:
    """The prompts as `messages` lists, in their fixed order."""
    conversations = []
    for system, user in USER_PROMPTS:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": user})
        conversations.append(messages)
    return conversations
