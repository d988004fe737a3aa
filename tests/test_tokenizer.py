"""Tests of gemma3n.text.tokenizer on tiny SentencePiece models trained here."""

import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from gemma3n.layers import special_ids as sid
from gemma3n.text import special_tokens as st
from gemma3n.text.tokenizer import StreamDecoder, Tokenizer, default_tokenizer_path
from tokenizer_files import RELEASED_PIECES, RELEASED_VOCAB_SIZE, released_layout

TOOL_PATH = Path(__file__).resolve().parents[1] / "tools" / "train_tiny_tokenizer.py"
# Small enough to train in ~0.1 s, large enough for real merges besides the 256 byte pieces.
NUM_SENTENCES = 2000
VOCAB_SIZE = 800
# Upper bound the shipped asset must respect (the package must stay small).
MAX_ASSET_BYTES = 300_000

ROUND_TRIP_TEXTS = [
    "Hello, world! How are you today?",
    "naïve café, crème brûlée, São Paulo, Zürich",
    "emoji: 😀🎉👍🏽 and a family 👨‍👩‍👧",
    "中文文本 日本語のテキスト 한국어",
    "  leading spaces, tabs\tand\nnew\n\nlines  ",
    "<start_of_turn>user\nHi<end_of_turn>\n",
    "",
]


def _load_tool():
    spec = importlib.util.spec_from_file_location("train_tiny_tokenizer", TOOL_PATH)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


TOOL = _load_tool()


def _train(directory: Path, name: str, user_defined_symbols=TOOL.USER_DEFINED_SYMBOLS,
           **overrides) -> Path:
    path = directory / f"{name}.model"
    path.write_bytes(TOOL.train_tokenizer(
        TOOL.build_corpus(NUM_SENTENCES), VOCAB_SIZE, user_defined_symbols, **overrides))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokenizers")


@pytest.fixture(scope="module")
def model_path(model_dir) -> Path:
    return _train(model_dir, "gemma_layout")


@pytest.fixture(scope="module")
def tokenizer(model_path) -> Tokenizer:
    return Tokenizer(model_path)


@pytest.fixture(scope="module")
def processor(model_path) -> spm.SentencePieceProcessor:
    """The raw SentencePiece model, to check the tokenizer against."""
    return spm.SentencePieceProcessor(model_file=str(model_path))


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_byte_fallback_is_used_for_unseen_characters(tokenizer):
    pieces = [tokenizer.id_to_piece(i) for i in tokenizer.encode("😀中")]
    # 😀 is 4 UTF-8 bytes and 中 is 3: none of them appears in the training text.
    assert pieces == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "<0xE4>", "<0xB8>", "<0xAD>"]


def test_special_ids_are_the_gemma_ids(tokenizer, processor):
    expected = {**st.REQUIRED_SPECIAL_TOKENS, **st.IMAGE_SPECIAL_TOKENS}
    assert {piece: tokenizer.piece_to_id(piece) for piece in expected} == expected
    assert {tokenizer.id_to_piece(i): i for i in expected.values()} == expected
    assert tokenizer.has_image_tokens
    # The image pieces sit at small ids inside this SentencePiece model; the tokenizer moves them.
    sp_image_ids = [processor.piece_to_id(piece) for piece in st.IMAGE_SPECIAL_TOKENS]
    assert all(i < tokenizer.vocab_size for i in sp_image_ids)
    assert tokenizer.vocab_size == processor.get_piece_size()


def test_encode_speaks_gemma_ids_and_decode_maps_back(tokenizer, processor):
    text = "Look:<start_of_image><end_of_image><start_of_turn>user\nHi<end_of_turn>"
    ids = tokenizer.encode(text)
    sp_to_gemma = {processor.piece_to_id(piece): gemma_id
                   for piece, gemma_id in st.IMAGE_SPECIAL_TOKENS.items()}
    assert ids == [sp_to_gemma.get(i, i) for i in processor.encode(text)]
    assert sid.START_OF_IMAGE in ids and sid.END_OF_IMAGE in ids and st.START_OF_TURN in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(np.array(ids, dtype=np.int32)) == text


def test_ids_left_by_moved_pieces_decode_to_their_piece(tokenizer, processor):
    sp_id = processor.piece_to_id(st.START_OF_IMAGE_PIECE)
    assert tokenizer.decode([sp_id]) == st.START_OF_IMAGE_PIECE
    assert sp_id not in tokenizer.encode(st.START_OF_IMAGE_PIECE)


def test_bos(tokenizer):
    text = "The quick fox."
    ids = tokenizer.encode(text, add_bos=True)
    assert ids == [st.BOS, *tokenizer.encode(text)]
    assert tokenizer.decode(ids) == text
    # BOS is a control piece: it is never parsed from text.
    assert st.BOS not in tokenizer.encode(st.BOS_PIECE)
    assert tokenizer.decode([st.BOS, st.EOS, sid.PAD]) == ""


def test_batch_forms(tokenizer):
    texts = ROUND_TRIP_TEXTS[:4]
    batch = tokenizer.encode_batch(texts, add_bos=True)
    assert batch == [tokenizer.encode(text, add_bos=True) for text in texts]
    assert tokenizer.decode_batch(batch) == texts


def test_encode_rejects_non_text(tokenizer):
    with pytest.raises(TypeError, match="encode_batch"):
        tokenizer.encode(["a", "b"])
    with pytest.raises(TypeError, match="item 1"):
        tokenizer.encode_batch(["a", 3])


@pytest.mark.parametrize("bad_id", [VOCAB_SIZE, sid.START_OF_IMAGE - 1, -1, sid.IMAGE_PLACEHOLDER])
def test_decode_rejects_ids_outside_the_vocabulary(tokenizer, bad_id):
    with pytest.raises(ValueError, match=f"token id {bad_id} is not in the vocabulary"):
        tokenizer.decode([5, bad_id])


def test_decode_rejects_2d_input(tokenizer):
    with pytest.raises(ValueError, match="1-D"):
        tokenizer.decode(np.zeros((2, 3), dtype=np.int32))


def test_unknown_piece_lookup(tokenizer):
    with pytest.raises(ValueError, match="'<no_such_piece>' is not in the vocabulary"):
        tokenizer.piece_to_id("<no_such_piece>")


def test_missing_required_piece(model_dir):
    without_end_of_turn = [s for s in TOOL.USER_DEFINED_SYMBOLS if s != st.END_OF_TURN_PIECE]
    path = _train(model_dir, "no_end_of_turn", without_end_of_turn)
    with pytest.raises(ValueError, match=r"no_end_of_turn\.model has no '<end_of_turn>' piece"):
        Tokenizer(path)


def test_special_piece_at_a_taken_gemma_id(model_dir):
    # Without the filler pieces <start_of_turn> lands at id 4, and id 105 belongs to another piece.
    without_fillers = [s for s in TOOL.USER_DEFINED_SYMBOLS if not s.startswith("<unused")]
    path = _train(model_dir, "no_fillers", without_fillers)
    with pytest.raises(ValueError, match="'<start_of_turn>' at id 4, but Gemma 3n uses id 105"):
        Tokenizer(path)


def test_text_only_tokenizer(model_dir):
    without_images = [s for s in TOOL.USER_DEFINED_SYMBOLS if s not in st.IMAGE_SPECIAL_TOKENS]
    tokenizer = Tokenizer(_train(model_dir, "text_only", without_images))
    assert not tokenizer.has_image_tokens
    assert sid.START_OF_IMAGE not in tokenizer.encode(st.START_OF_IMAGE_PIECE)
    with pytest.raises(ValueError, match="token id 255999"):
        tokenizer.decode([sid.START_OF_IMAGE])


def test_half_of_the_image_pieces_is_text_only(model_dir):
    without_end = [s for s in TOOL.USER_DEFINED_SYMBOLS if s != st.END_OF_IMAGE_PIECE]
    tokenizer = Tokenizer(_train(model_dir, "half_image", without_end))
    assert not tokenizer.has_image_tokens
    with pytest.raises(ValueError, match="token id 255999"):
        tokenizer.decode([sid.START_OF_IMAGE])


def test_the_released_vocabulary_layout_loads(model_dir):
    tokenizer = Tokenizer(released_layout(model_dir / "released_layout.model"))
    assert tokenizer.vocab_size == RELEASED_VOCAB_SIZE
    # The seed's pair is not there (256000 is <start_of_audio>): text-only for SigLIP, no error.
    assert not tokenizer.has_image_tokens
    assert {tokenizer.id_to_piece(i): i for i in RELEASED_PIECES} == {
        piece: i for i, piece in RELEASED_PIECES.items()}
    text = "Hi<start_of_audio>there<end_of_image>"
    ids = tokenizer.encode(text)
    assert 256000 in ids and 262144 in ids and tokenizer.decode(ids) == text
    for required, gemma_id in st.REQUIRED_SPECIAL_TOKENS.items():
        assert tokenizer.piece_to_id(required) == gemma_id


def test_missing_file(tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer(tmp_path)


def test_unreadable_file(tmp_path):
    path = tmp_path / "garbage.model"
    path.write_bytes(b"this is not a SentencePiece model")
    with pytest.raises(ValueError, match="garbage.model as a SentencePiece model"):
        Tokenizer(path)


def _stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    decoder = StreamDecoder(tokenizer)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_stream_matches_decode_on_multibyte_text(tokenizer):
    text = "Café 😀 in 中文! naïve  spaces\n\nand ẞ."
    ids = tokenizer.encode(text, add_bos=True)
    pieces = _stream(tokenizer, ids)
    assert "".join(pieces) == text
    # Nothing half-decoded leaks out: no piece carries a replacement character.
    assert not any("\ufffd" in piece for piece in pieces)
    # 😀 arrives as 4 byte tokens: the first three yield nothing, the fourth the whole emoji.
    emoji_start = [tokenizer.id_to_piece(i) for i in ids].index("<0xF0>")
    assert pieces[emoji_start:emoji_start + 4] == ["", "", "", "😀"]


def test_stream_flush_returns_an_incomplete_character_as_decode_does(tokenizer):
    ids = tokenizer.encode("ok 😀")[:-1]
    pieces = _stream(tokenizer, ids)
    assert pieces[-1].endswith("\ufffd")
    assert "".join(pieces) == tokenizer.decode(ids)


@pytest.fixture(scope="module")
def dummy_prefix_tokenizer(model_dir) -> Tokenizer:
    """SentencePiece's default whitespace handling, which drops a leading space on decode."""
    return Tokenizer(_train(model_dir, "dummy_prefix", add_dummy_prefix=True))


@pytest.fixture(scope="module")
def extra_whitespace_tokenizer(model_dir) -> Tokenizer:
    """Drops all leading spaces on decode."""
    return Tokenizer(_train(model_dir, "extra_whitespace", remove_extra_whitespaces=True))


@pytest.mark.parametrize("which", ["tokenizer", "dummy_prefix_tokenizer",
                                   "extra_whitespace_tokenizer"])
def test_stream_matches_decode_on_random_ids(request, which):
    tokenizer = request.getfixturevalue(which)
    rng = random.Random(0)
    spaces = [tokenizer.piece_to_id(p) for p in ("▁", "▁the", "▁a")]
    bytes_ = [tokenizer.piece_to_id(f"<0x{b:02X}>") for b in (0xE4, 0xB8, 0xAD, 0xF0, 0x9F, 0x41)]
    specials = [st.BOS, st.EOS, sid.PAD, st.START_OF_TURN, st.END_OF_TURN, sid.START_OF_IMAGE]
    # Random ids, biased towards the cases that break naive streaming: leading-space pieces,
    # partial UTF-8 byte sequences and invisible control tokens.
    pools = [list(range(tokenizer.vocab_size)), spaces, bytes_, specials]
    for _ in range(200):
        ids = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 12))]
        assert "".join(_stream(tokenizer, ids)) == tokenizer.decode(ids), ids


def test_stream_decoder_restarts_after_flush(dummy_prefix_tokenizer):
    tokenizer = dummy_prefix_tokenizer
    decoder = StreamDecoder(tokenizer)
    for text in ("first answer", " second answer"):
        ids = tokenizer.encode(text)
        streamed = "".join(decoder.push(i) for i in ids) + decoder.flush()
        assert streamed == tokenizer.decode(ids)


def test_shipped_asset():
    path = default_tokenizer_path()
    assert path.name == "tokenizer.model" and path.parent.name == "assets"
    assert path.stat().st_size <= MAX_ASSET_BYTES
    tokenizer = Tokenizer(path)
    assert 2000 <= tokenizer.vocab_size <= TOOL.VOCAB_SIZE
    assert tokenizer.has_image_tokens
    expected = {**st.REQUIRED_SPECIAL_TOKENS, **st.IMAGE_SPECIAL_TOKENS,
                st.DOUBLE_NEWLINE_PIECE: sid.DOUBLE_NEWLINE}
    assert {piece: tokenizer.piece_to_id(piece) for piece in expected} == expected
    for text in ROUND_TRIP_TEXTS:
        assert tokenizer.decode(tokenizer.encode(text, add_bos=True)) == text
    # English text seen in training compresses well (a sanity check that merges were learned).
    assert len(tokenizer.encode("The happy teacher visited the museum.")) <= 8
