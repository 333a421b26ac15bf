"""Incremental decoding and the token hand-off (text_generation.detokenizer), on real tokenizers
built here: byte-level BPE (GPT-2 style, as the tiny LLaVA uses) and SentencePiece-style Metaspace
(as Llama and LLaVA-1.5 use), fed token by token and in uneven batches."""

from __future__ import annotations

import random
import threading

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from text_generation.detokenizer import IncrementalDetokenizer, TokenHandOff

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 3.5 m/s — fast!",
    "Grüße aus Köln: Straße, Maß, naïve café, 東京タワー, 🙂🚀 and a newline\nthen  two spaces.",
    "  leading spaces, trailing spaces  ",
]


def tokenizer(style: str) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=style == "metaspace"))
    if style == "byte-level":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Metaspace()])
        alphabet = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet)
    backend.train_from_iterator([" ".join(TEXTS[:1]) * 3, "hello world over and over"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("style", ["byte-level", "metaspace"])
@pytest.mark.parametrize("text", TEXTS)
def test_pieces_add_up_to_the_whole_decoded_text_whatever_the_batches(style: str, text: str) -> None:
    tok = tokenizer(style)
    ids = [*tok(text, add_special_tokens=False).input_ids, tok.eos_token_id]
    whole = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert any(len(tok.decode([i])) != 1 for i in ids), "the text has tokens that are not whole characters"
    for seed in range(4):
        rng = random.Random(seed)
        detokenizer, pieces, at = IncrementalDetokenizer(tok), [], 0
        while at < len(ids):
            size = 1 if seed == 0 else rng.randint(1, 4)  # seed 0: one token at a time
            pieces.append(detokenizer.add(ids[at : at + size]))
            at += size
        assert "".join(pieces) == whole
        assert "\ufffd" not in "".join(pieces), "no half characters were given out"


def test_each_call_decodes_a_short_window_not_the_whole_answer() -> None:
    tok = tokenizer("byte-level")
    decoded_lengths: list[int] = []
    original = tok.decode

    class Counting:
        def decode(self, ids, **kwargs):  # type: ignore[no-untyped-def]
            decoded_lengths.append(len(ids))
            return original(ids, **kwargs)

    detokenizer = IncrementalDetokenizer(Counting())
    ids = tok(TEXTS[0] * 8, add_special_tokens=False).input_ids
    assert "".join(detokenizer.add([i]) for i in ids) == tok.decode(ids, clean_up_tokenization_spaces=False)
    assert max(decoded_lengths) <= 8 < len(ids), "decoding stays local as the answer grows"


def test_the_hand_off_skips_the_prompt_and_gives_every_token_once_in_order() -> None:
    hand_off = TokenHandOff()
    hand_off.put(torch.tensor([[101, 102, 103]]))  # generate gives the prompt first

    def produce() -> None:
        for token in range(200):
            hand_off.put(torch.tensor([token]))
        hand_off.end()

    producer = threading.Thread(target=produce)
    producer.start()
    batches = list(hand_off.batches())
    producer.join()
    assert [token for batch in batches for token in batch] == list(range(200))
