"""SentencePiece tokenizer that speaks the Gemma 3n token ids, and a streaming detokenizer.

The Gemma 3n `tokenizer.model` holds every special piece at its Gemma id. A small SentencePiece
model (like the one shipped in `gemma3n/assets`) cannot: a 4k-piece vocabulary has no id 255999.
`Tokenizer` therefore translates: a special piece whose SentencePiece id differs from its Gemma id
is encoded as the Gemma id and the Gemma id is decoded back to the piece. This is only allowed when
the Gemma id lies beyond the SentencePiece vocabulary, so no other piece owns it.
"""

import importlib.resources
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from gemma3n.text import special_tokens
from gemma3n.validation import is_integer

_PACKAGE = "gemma3n"
_ASSET_DIRECTORY = "assets"
_ASSET_NAME = "tokenizer.model"
# SentencePiece decodes a byte sequence that is not (yet) valid UTF-8 to U+FFFD.
_REPLACEMENT_CHARACTER = "\ufffd"


def default_tokenizer_path() -> Path:
    """Returns the path of the tiny SentencePiece model shipped inside the package.

    It speaks the Gemma special ids (see `gemma3n.text.special_tokens`) but has a vocabulary of
    only a few thousand pieces; it is meant for the random-weight default model, not for real
    Gemma 3n checkpoints (which need Gemma 3n's own `tokenizer.model`).

    Example:
        >>> default_tokenizer_path().name
        'tokenizer.model'
    """
    path = Path(str(importlib.resources.files(_PACKAGE) / _ASSET_DIRECTORY / _ASSET_NAME))
    if not path.is_file():
        raise FileNotFoundError(
            f"the packaged tokenizer {path} is missing: gemma3n was installed without its "
            f"package data ({_ASSET_DIRECTORY}/{_ASSET_NAME})")
    return path


class Tokenizer:
    """A SentencePiece model file, speaking Gemma 3n token ids.

    Every id that goes in or comes out is a Gemma id: the special pieces always have the ids of
    `gemma3n.text.special_tokens`, whatever their ids inside the SentencePiece file (see the
    module docstring). `<pad>`, `<eos>`, `<bos>`, `<unk>`, `<start_of_turn>` and `<end_of_turn>`
    are required; `<start_of_image>`/`<end_of_image>` at the seed's ids are optional
    (`has_image_tokens`).

    `decode` also accepts the SentencePiece ids that a translated special piece leaves unused
    (they decode to that piece), so sampling from a model whose vocabulary is the SentencePiece
    vocabulary can never produce an undecodable id; `encode` never produces them.

    Example:
        >>> tokenizer = Tokenizer(default_tokenizer_path())
        >>> ids = tokenizer.encode("Hello world", add_bos=True)
        >>> ids[0] == special_tokens.BOS
        True
        >>> tokenizer.decode(ids)
        'Hello world'
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)
        if not self._path.is_file():
            raise FileNotFoundError(f"tokenizer model file not found: {self._path}")
        try:
            self._processor = spm.SentencePieceProcessor(model_file=str(self._path))
        except (OSError, RuntimeError) as error:
            raise ValueError(
                f"cannot read {self._path} as a SentencePiece model: {error}") from error
        self._vocab_size = self._processor.get_piece_size()
        self._gemma_to_sp: dict[int, int] = {}
        self._sp_to_gemma: dict[int, int] = {}
        for piece, gemma_id in special_tokens.REQUIRED_SPECIAL_TOKENS.items():
            sp_id = self._find_piece(piece)
            if sp_id is None:
                raise ValueError(
                    f"tokenizer {self._path} has no {piece!r} piece, which Gemma 3n needs")
            self._translate(piece, sp_id, gemma_id)
        self._has_image_tokens = self._speak_image_pieces()

    def _speak_image_pieces(self) -> bool:
        """Speaks `<start_of_image>`/`<end_of_image>` at the seed's ids (255999, 256000) when this
        vocabulary lets it; returns whether it does.

        They are optional: only the seed's SigLIP image blocks use them. The released Gemma 3n
        vocabulary gives 256000 to `<start_of_audio>` and `<end_of_image>` 262144; its towers take
        their ids from the model's config (`TowersConfig`), so such a tokenizer is valid and simply
        does not speak the seed's pair.
        """
        found = {piece: self._find_piece(piece) for piece in special_tokens.IMAGE_SPECIAL_TOKENS}
        for piece, sp_id in found.items():
            gemma_id = special_tokens.IMAGE_SPECIAL_TOKENS[piece]
            if sp_id is None or (sp_id != gemma_id and gemma_id < self._vocab_size):
                return False
        for piece, sp_id in found.items():
            self._translate(piece, sp_id, special_tokens.IMAGE_SPECIAL_TOKENS[piece])
        return True

    def _find_piece(self, piece: str) -> int | None:
        """Returns the SentencePiece id of `piece`, or None when the vocabulary lacks it."""
        # piece_to_id answers the <unk> id for unknown pieces instead of failing.
        sp_id = self._processor.piece_to_id(piece)
        return sp_id if self._processor.id_to_piece(sp_id) == piece else None

    def _translate(self, piece: str, sp_id: int, gemma_id: int) -> None:
        if sp_id == gemma_id:
            return
        if gemma_id < self._vocab_size:
            raise ValueError(
                f"tokenizer {self._path} has {piece!r} at id {sp_id}, but Gemma 3n uses id "
                f"{gemma_id} for it, which this vocabulary gives to "
                f"{self._processor.id_to_piece(gemma_id)!r}")
        self._gemma_to_sp[gemma_id] = sp_id
        self._sp_to_gemma[sp_id] = gemma_id

    @property
    def path(self) -> Path:
        """The SentencePiece model file."""
        return self._path

    @property
    def vocab_size(self) -> int:
        """Number of pieces in the SentencePiece model.

        Translated special ids (e.g. `<start_of_image>` = 255999 in a small vocabulary) lie beyond
        it: a model that must embed them needs a larger embedding table.
        """
        return self._vocab_size

    @property
    def has_image_tokens(self) -> bool:
        """Whether `<start_of_image>` and `<end_of_image>` are spoken as 255999 and 256000, the ids
        the seed's SigLIP image blocks use."""
        return self._has_image_tokens

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Returns the Gemma token ids of `text`, BOS first when `add_bos`."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}; "
                            "use encode_batch for several texts")
        return self._from_sp(self._processor.encode(text), add_bos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """Returns `[encode(text, add_bos) for text in texts]`."""
        texts = list(texts)
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"encode_batch expects str items, item {index} is a "
                                f"{type(text).__name__}")
        return [self._from_sp(ids, add_bos) for ids in self._processor.encode(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        """Returns the text of Gemma token ids (a sequence or 1-D array of ints)."""
        return self._processor.decode(self._to_sp(ids))

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        """Returns `[decode(ids) for ids in batch]`."""
        return self._processor.decode([self._to_sp(ids) for ids in batch])

    def piece_to_id(self, piece: str) -> int:
        """Returns the Gemma id of a vocabulary piece, e.g. `'<end_of_turn>'` -> 106."""
        sp_id = self._find_piece(piece)
        if sp_id is None:
            raise ValueError(f"piece {piece!r} is not in the vocabulary of {self._path}")
        return self._sp_to_gemma.get(sp_id, sp_id)

    def id_to_piece(self, token_id: int) -> str:
        """Returns the vocabulary piece of a Gemma id, e.g. 106 -> `'<end_of_turn>'`."""
        return self._processor.id_to_piece(self._to_sp([token_id])[0])

    def _from_sp(self, sp_ids: list[int], add_bos: bool) -> list[int]:
        ids = [self._sp_to_gemma.get(i, i) for i in sp_ids] if self._sp_to_gemma else sp_ids
        return [special_tokens.BOS, *ids] if add_bos else ids

    def _to_sp(self, ids: Iterable[int]) -> list[int]:
        if getattr(ids, "ndim", 1) != 1:
            raise ValueError(f"decode expects a 1-D sequence of token ids, got shape {ids.shape}")
        sp_ids = []
        for token_id in ids:
            if not is_integer(token_id):
                raise TypeError(f"decode expects integer token ids, got "
                                f"{type(token_id).__name__} {token_id!r}")
            token_id = int(token_id)
            if 0 <= token_id < self._vocab_size:
                sp_ids.append(token_id)
            elif token_id in self._gemma_to_sp:
                sp_ids.append(self._gemma_to_sp[token_id])
            else:
                raise ValueError(
                    f"token id {token_id} is not in the vocabulary of {self._path} "
                    f"(ids 0..{self._vocab_size - 1}"
                    + "".join(f", {i}" for i in sorted(self._gemma_to_sp)) + ")")
        return sp_ids


class StreamDecoder:
    """Turns token ids arriving one at a time into text pieces, for streaming output.

    The concatenation of everything `push` and `flush` return equals `tokenizer.decode` of all
    pushed ids. Text is held back while it ends in an incomplete UTF-8 character (byte-fallback
    tokens arrive one byte at a time). Each step decodes only a short window: the ids since the
    last returned text plus the ids of that text, whose decoded text is subtracted, so that
    SentencePiece's removal of a leading space at the start of a decode cancels out.

    Example:
        >>> tokenizer = Tokenizer(default_tokenizer_path())
        >>> decoder = StreamDecoder(tokenizer)
        >>> pieces = [decoder.push(token_id) for token_id in tokenizer.encode("Café 😀")]
        >>> pieces[-4:]  # the emoji's four byte tokens
        ['', '', '', '😀']
        >>> "".join(pieces) + decoder.flush()
        'Café 😀'
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._reset()

    def _reset(self) -> None:
        self._ids: list[int] = []
        # Window start: the text before it is final and ends on a character boundary.
        self._window_start = 0
        # The text of ids[:read_end] has been returned.
        self._read_end = 0
        # decode(ids[window_start:read_end]), subtracted from the window's text.
        self._window_prefix = ""

    def push(self, token_id: int) -> str:
        """Adds one token id; returns the text it completes (often '', never retracted)."""
        self._ids.append(int(token_id))
        window_text = self._tokenizer.decode(self._ids[self._window_start:])
        if window_text.endswith(_REPLACEMENT_CHARACTER):
            # Possibly the first bytes of a character whose remaining bytes are still to come.
            return ""
        new_text = window_text[len(self._window_prefix):]
        # Move the window start to the first unreturned id only once the ids after it decode to
        # something: SentencePiece keeps removing leading spaces until the decoded text is
        # non-empty, so a window starting earlier than the full decode's first text would
        # otherwise lose a space that the full decode keeps.
        newest_text = self._tokenizer.decode(self._ids[self._read_end:])
        if newest_text:
            self._window_start = self._read_end
            self._window_prefix = newest_text
        else:
            self._window_prefix = window_text
        self._read_end = len(self._ids)
        return new_text

    def flush(self) -> str:
        """Returns the text still held back (an incomplete character decodes to U+FFFD) and
        starts a new stream."""
        window_text = self._tokenizer.decode(self._ids[self._window_start:])
        rest = window_text[len(self._window_prefix):]
        self._reset()
        return rest
