"""A small byte-level BPE tokenizer trained in-process, for the tiny assembly and tests.

It needs no download: it is trained (deterministically, in well under a second) on a built-in
corpus plus any extra text given, and wrapped as a ``PreTrainedTokenizerFast`` so it behaves like
any Hugging Face tokenizer (padding, truncation, special tokens, ``model_max_length``).
"""

from __future__ import annotations

from functools import lru_cache

_CORPUS = """
a red circle. a small blue square in the top left. a large green triangle at the bottom.
the shape is yellow and moves to the right. a high pitched beep that repeats slowly.
a low hum with a fast rhythm. describe this image. draw a picture of a cat.
make a sound of a bell. show me a short clip of a ball moving left. here is the image you asked for.
user assistant system hello how are you? i am fine, thank you. what is in the picture?
it is a purple star in the centre of the frame. the sound is a soft sine tone at middle pitch.
""" * 4


CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)


@lru_cache(maxsize=8)
def _trained_json(vocab_size: int, extra_text: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|bos|>", "<|eos|>"]  # ids 0, 1, 2
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS, extra_text], trainer=trainer)
    return tok.to_str()


def build_tiny_tokenizer(vocab_size: int = 512, model_max_length: int = 256, extra_text: str = ""):
    """A fresh tokenizer object each call (callers may add tokens to it); training is cached."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_json(vocab_size, extra_text)),
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        model_max_length=model_max_length,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
