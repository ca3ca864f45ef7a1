"""`TextStream`: the pieces of a streamed choice add up to its final text, on the tiny model's byte-level BPE
tokenizer (random token sequences split characters across tokens), with and without stop strings."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from vlrl.serve.textstream import TextStream


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> object:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _final(tok: object, ids: list[int], stop: list[str]) -> str:
    text = tok.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(cuts)] if cuts else text


def test_pieces_add_up_to_the_final_text_and_never_pass_a_stop_string(tokenizer: object) -> None:
    rng = random.Random(0)
    vocab = len(tokenizer)  # type: ignore[arg-type]
    multi_piece = 0
    for case in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
        whole = tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]
        stop: list[str] = []
        if case % 2 and len(whole) > 4:  # every other case stops at a piece of its own text
            k = rng.randrange(len(whole) - 3)
            stop = [whole[k : k + rng.randint(1, 3)]]
        final = _final(tokenizer, ids, stop)
        stream = TextStream(tokenizer, stop)
        pieces = [stream.push([i]) for i in ids]
        sent = "".join(pieces)
        assert final.startswith(sent), (ids, stop)  # nothing sent that the final text does not hold
        pieces.append(stream.finish(final))
        assert "".join(pieces) == final, (ids, stop)
        multi_piece += sum(bool(p) for p in pieces) > 1
    assert multi_piece > 100  # most texts did stream in several pieces


def test_a_character_split_over_tokens_is_held_until_whole(tokenizer: object) -> None:
    ids = tokenizer.encode("a\u00e9\u4e2d\U0001f600b", add_special_tokens=False)  # type: ignore[attr-defined]
    stream = TextStream(tokenizer)
    pieces = [stream.push([i]) for i in ids]
    assert "".join(pieces) == "a\u00e9\u4e2d\U0001f600b" and all("\ufffd" not in p for p in pieces)


def test_text_that_may_start_a_stop_string_waits(tokenizer: object) -> None:
    stream = TextStream(tokenizer, stop=["END"])
    encode = tokenizer.encode  # type: ignore[attr-defined]
    sent = "".join(stream.push(encode(ch, add_special_tokens=False)) for ch in "abcEN")
    assert sent == "abc"  # "EN" could begin "END"
    assert stream.push(encode("D", add_special_tokens=False)) == ""
    assert stream.finish("abc") == ""
