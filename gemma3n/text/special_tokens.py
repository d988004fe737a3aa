"""The Gemma 3n special token ids and the SentencePiece pieces that carry them.

These ids are what the model sees: the embedding rows and the sampler's stop tokens use them.
The ids the model itself acts on (padding, the image block) are defined below the model, in
`gemma3n.layers.special_ids`; this module names their pieces. `Tokenizer` always speaks these
ids, even for a small SentencePiece model whose own ids for the pieces differ (see
`gemma3n.text.tokenizer`).

Example:
    >>> from gemma3n.text import special_tokens as st
    >>> st.REQUIRED_SPECIAL_TOKENS[st.END_OF_TURN_PIECE] == st.END_OF_TURN
    True
"""

from types import MappingProxyType
from typing import Mapping

from gemma3n.layers import special_ids

EOS = 1
BOS = 2
UNK = 3
START_OF_TURN = 105
END_OF_TURN = 106

PAD_PIECE = "<pad>"
EOS_PIECE = "<eos>"
BOS_PIECE = "<bos>"
UNK_PIECE = "<unk>"
START_OF_TURN_PIECE = "<start_of_turn>"
END_OF_TURN_PIECE = "<end_of_turn>"
DOUBLE_NEWLINE_PIECE = "\n\n"
START_OF_IMAGE_PIECE = "<start_of_image>"
# Where a clip goes in a prompt for a model with the released audio tower; the model's own id for
# it comes from its config (`TowersConfig.audio_ids.marker`), whatever the tokenizer holds.
START_OF_AUDIO_PIECE = "<start_of_audio>"
END_OF_IMAGE_PIECE = "<end_of_image>"

# Pieces every usable tokenizer must have, with the Gemma id each must be spoken as.
REQUIRED_SPECIAL_TOKENS: Mapping[str, int] = MappingProxyType({
    PAD_PIECE: special_ids.PAD,
    EOS_PIECE: EOS,
    BOS_PIECE: BOS,
    UNK_PIECE: UNK,
    START_OF_TURN_PIECE: START_OF_TURN,
    END_OF_TURN_PIECE: END_OF_TURN,
})

# Pieces only needed for images; a tokenizer without them is text-only.
IMAGE_SPECIAL_TOKENS: Mapping[str, int] = MappingProxyType({
    START_OF_IMAGE_PIECE: special_ids.START_OF_IMAGE,
    END_OF_IMAGE_PIECE: special_ids.END_OF_IMAGE,
})
