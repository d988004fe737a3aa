"""SentencePiece model files laid out like other vocabularies, made from the shipped one."""

from pathlib import Path

from sentencepiece import sentencepiece_model_pb2

from gemma3n.text import special_tokens as st
from gemma3n.text.tokenizer import default_tokenizer_path

# The released Gemma 3n vocabulary (262400 pieces): its tower markers and end tokens where the
# model's config puts them, so 256000 is not <end_of_image> as the seed's SigLIP blocks expect.
RELEASED_VOCAB_SIZE = 262400
RELEASED_PIECES = {255999: st.START_OF_IMAGE_PIECE, 256000: st.START_OF_AUDIO_PIECE,
                   262144: st.END_OF_IMAGE_PIECE, 262145: "<image_soft_token>",
                   262272: "<end_of_audio>", 262273: "<audio_soft_token>"}
_PIECE = sentencepiece_model_pb2.ModelProto.SentencePiece


def released_layout(path: Path) -> Path:
    """Writes at `path` the shipped model's pieces, its image pieces renamed, padded to the
    released vocabulary with unused pieces and `RELEASED_PIECES` at their ids."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(default_tokenizer_path().read_bytes())
    for piece in proto.pieces:
        if piece.piece in st.IMAGE_SPECIAL_TOKENS:
            piece.piece = f"<renamed{piece.piece}"
    for index in range(len(proto.pieces), RELEASED_VOCAB_SIZE):
        piece = proto.pieces.add()
        piece.piece = RELEASED_PIECES.get(index, f"<pad{index}>")
        piece.type = _PIECE.USER_DEFINED if index in RELEASED_PIECES else _PIECE.UNUSED
    path.write_bytes(proto.SerializeToString())
    return path
