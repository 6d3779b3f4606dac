"""A tiny random Llama model that vLLM's CPU backend can load in tests.

`build_tiny_llama(path)` writes a complete model directory (float32 safetensors
weights, byte-level BPE tokenizer with a chat template, generation config) in a
few seconds. The weights are random but deterministic. The lm_head rows of EOS,
the other special tokens and the tokens that do not decode to printable ASCII
are zero, so greedy decoding never picks them: generations run until
max_tokens and their text is plain printable ASCII.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# A reasoning model's markers, as single tokens (vLLM's reasoning parsers look them up in the vocabulary).
THINK_TOKENS = ("<think>", "</think>")
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *ROLE_TOKENS, *THINK_TOKENS)

# The template emits BOS itself; it is tokenized with add_special_tokens=False,
# so the rendered prompt carries exactly one BOS. Asked for no thinking
# (chat_template_kwargs {"enable_thinking": false}), it closes the thinking in
# the prompt, as Qwen3's does; it names no opening marker, so the runner does
# not take the model for a reasoning model unless REASONING_PARSER says so.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '</think>\n\n' }}{% endif %}"
    "{% endif %}"
)

TARGET_VOCAB_SIZE = 768
MAX_POSITION_EMBEDDINGS = 4096
SEED = 0

TRAINING_CORPUS = """\
The quick brown fox jumps over the lazy dog.
Once upon a time, in a small village by the sea, there lived an old fisherman.
Every morning he walked down to the harbour and checked his nets.
What is the capital of France? The capital of France is Paris.
Can you tell me a story about a dragon who learned to read?
Hello! How are you today? I am fine, thank you for asking.
Please write a short poem about the moon and the stars.
The weather today is sunny with a light breeze from the west.
Machine learning models turn text into tokens and predict the next one.
A large language model answers questions, writes code and summarises documents.
She opened the window, and the smell of fresh bread filled the kitchen.
They counted 1, 2, 3, 4, 5, 6, 7, 8, 9 and 10 apples in the basket.
In 2024 the team shipped version 3.5 of the server with 12 new features.
Water boils at 100 degrees Celsius at sea level.
The library opens at nine o'clock and closes at six in the evening.
"Where are we going?" asked the child. "Home," said her mother.
Good morning, everyone. Today we will learn about the history of computers.
Rivers flow into the ocean, and the ocean feeds the clouds with rain.
This is a test of the streaming response with many small pieces of text.
Thank you very much for your help; I could not have done it without you.
The system prompt tells the assistant how it should behave.
The user asks a question and the assistant replies with a helpful answer.
"""


def _train_tokenizer():
    """Train a byte-level BPE tokenizer and wrap it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        # Starting from all 256 byte symbols makes every string encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_CORPUS.splitlines(), trainer=trainer)

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[*ROLE_TOKENS, *THINK_TOKENS],
        add_bos_token=True,
        add_eos_token=False,
        chat_template=TINY_CHAT_TEMPLATE,
        model_max_length=MAX_POSITION_EMBEDDINGS,
    )


def _suppressed_token_ids(tokenizer) -> list[int]:
    """Special tokens and tokens whose text is not printable ASCII (or a newline).

    Generating raw byte tokens would give control characters and broken UTF-8.
    """

    def is_plain_text(text: str) -> bool:
        return bool(text) and all(
            char == "\n" or (char.isascii() and char.isprintable()) for char in text
        )

    special_ids = set(tokenizer.all_special_ids)
    return [
        token_id
        for token_id in range(len(tokenizer))
        if token_id in special_ids or not is_plain_text(tokenizer.decode([token_id]))
    ]


def _write_model(out_dir: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 32: the CPU attention backend rejects 16
        num_key_value_heads=1,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype=torch.float32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        # A zero row gives a logit of exactly 0, below the maximum of hundreds of
        # random logits, so greedy decoding never picks these tokens.
        model.lm_head.weight[_suppressed_token_ids(tokenizer)] = 0.0
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )

    model.save_pretrained(out_dir, safe_serialization=True)
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)


def build_tiny_llama(path: Path) -> Path:
    """Build the tiny model in `path` unless `path/config.json` already exists.

    Files are written to a temp folder and moved into `path` with config.json
    last, so an existing config.json means a complete model.
    """
    path = Path(path)
    if (path / "config.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tiny-llama-", dir=path.parent) as tmp:
        build_dir = Path(tmp)
        _write_model(build_dir)
        files = sorted(build_dir.iterdir(), key=lambda file: file.name == "config.json")
        for file in files:
            os.replace(file, path / file.name)
    return path


if __name__ == "__main__":
    import sys

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "tiny-llama"
    print(build_tiny_llama(target))
    for file in sorted(target.iterdir()):
        print(f"  {file.name}: {file.stat().st_size} bytes")
