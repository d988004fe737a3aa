"""Tests of gemma3n.text.chat_format: exact turn strings and per-turn tokenization."""

import importlib.util
from pathlib import Path

import pytest

from gemma3n.text import special_tokens as st
from gemma3n.text.chat_format import (
    format_continuation,
    format_conversation,
    format_turn,
    format_user_turn,
)
from gemma3n.text.tokenizer import Tokenizer, default_tokenizer_path

TOOL_PATH = Path(__file__).resolve().parents[1] / "tools" / "train_tiny_tokenizer.py"
NUM_SENTENCES = 2000
VOCAB_SIZE = 800

TWO_TURNS = [
    ("user", "What is 2+2?"),
    ("model", "It is 4."),
    ("user", "And 3+3?"),
]
TWO_TURNS_TEXT = (
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
    "<start_of_turn>model\nIt is 4.<end_of_turn>\n"
    "<start_of_turn>user\nAnd 3+3?<end_of_turn>\n"
    "<start_of_turn>model\n"
)


def test_user_turn():
    assert format_user_turn("Hi there") == (
        "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n")


def test_two_turn_conversation():
    assert format_conversation(TWO_TURNS) == TWO_TURNS_TEXT


def test_conversation_without_generation_prompt():
    turns = TWO_TURNS[:2]
    assert format_conversation(turns, add_generation_prompt=False) == (
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\nIt is 4.<end_of_turn>\n")


def test_turn_by_turn_text_equals_the_conversation():
    # What a multi-turn chat feeds: prompt 1, answer 1 ended by its <end_of_turn>, continuation.
    (_, message_1), (_, answer_1), (_, message_2) = TWO_TURNS
    text = (format_user_turn(message_1) + answer_1 + st.END_OF_TURN_PIECE
            + format_continuation(message_2))
    assert text == TWO_TURNS_TEXT
    assert format_continuation("x") == (
        "\n<start_of_turn>user\nx<end_of_turn>\n<start_of_turn>model\n")


@pytest.mark.parametrize("turns, message", [
    ([], "at least one turn"),
    ([("model", "Hi")], "turn 0 has role 'model'"),
    ([("user", "a"), ("user", "b")], "turn 1 has role 'user'"),
    ([("user", "a"), ("system", "b")], "turn 1 has role 'system'"),
    ([("user", "a"), ("model", "b")], "last turn to be a user turn"),
])
def test_bad_conversations(turns, message):
    with pytest.raises(ValueError, match=message):
        format_conversation(turns)


def test_bad_role():
    with pytest.raises(ValueError, match="unknown chat role 'assistant'"):
        format_turn("assistant", "Hi")


@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory) -> Tokenizer:
    spec = importlib.util.spec_from_file_location("train_tiny_tokenizer", TOOL_PATH)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    path = tmp_path_factory.mktemp("chat_tokenizer") / "tokenizer.model"
    path.write_bytes(tool.train_tokenizer(tool.build_corpus(NUM_SENTENCES), VOCAB_SIZE))
    return Tokenizer(path)


@pytest.mark.parametrize("which", ["trained", "shipped"])
def test_per_turn_token_streams_equal_the_whole_conversation(which, trained_tokenizer):
    tokenizer = trained_tokenizer if which == "trained" else Tokenizer(default_tokenizer_path())
    messages = ["Hello! Can you help me?", "Écris un poème 😀 sur le café.", "Thanks\n\nbye"]
    answers = ["Sure, what do you need?", "Voilà: 中文 et café.\n- one\n- two"]
    streams = [tokenizer.encode(format_user_turn(messages[0]), add_bos=True)]
    turns = [("user", messages[0])]
    for answer, message in zip(answers, messages[1:]):
        # The sampled answer (here: its canonical ids) and the END_OF_TURN that stopped it.
        streams.append(tokenizer.encode(answer) + [st.END_OF_TURN])
        streams.append(tokenizer.encode(format_continuation(message)))
        turns += [("model", answer), ("user", message)]
    per_turn = [token for stream in streams for token in stream]
    whole = tokenizer.encode(format_conversation(turns), add_bos=True)
    assert per_turn == whole
    # 5 closed turns and the generation prompt.
    assert whole.count(st.START_OF_TURN) == 6 and whole.count(st.END_OF_TURN) == 5
