"""Tokenizer loading and the Phi-3 chat format.

The published processor tokenizes with the *fast* tokenizer defined by `tokenizer.json` (its normalizer prepends
"▁" to every text piece, also right after a special token: `<|user|>\\n` -> `[1, 32010, 29871, 13]`). Recent
transformers releases rebuild a `LlamaTokenizer` from `tokenizer_config.json` instead, which drops that "▁"
(`[1, 32010, 13]`) and so changes every prompt. We therefore always load `tokenizer.json` as it is.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerFast

#: The published chat template: `<|{role}|>\n{content}<|end|>\n` per message, then `<|assistant|>\n`.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
    "{{- '<|assistant|>\n' -}}{% endif %}"
)

SPECIAL_TOKENS = {
    "bos": "<s>",
    "eos": "<|endoftext|>",
    "pad": "<|endoftext|>",
    "unk": "<unk>",
    "end": "<|end|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "system": "<|system|>",
}


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerFast:
    """Load the tokenizer of a Phi-3-vision folder exactly as the published processor used it."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder}: no tokenizer.json (a Phi-3-vision model folder has one)")
    tok = PreTrainedTokenizerFast.from_pretrained(str(folder))
    if tok.pad_token is None:
        tok.pad_token = SPECIAL_TOKENS["pad"]
    if not getattr(tok, "chat_template", None):
        tok.chat_template = CHAT_TEMPLATE
    return tok


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end an answer: `<|end|>` and `<|endoftext|>` (what generation stops on in practice)."""
    ids = [tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["end"]), tokenizer.eos_token_id]
    return [i for i in dict.fromkeys(ids) if i is not None and i != tokenizer.unk_token_id]
