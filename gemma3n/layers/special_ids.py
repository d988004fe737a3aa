"""The token ids the model itself gives a meaning to: padding and the image block's tokens.

The model masks padding, expands each `<start_of_image>` into an image block and overwrites the
block's placeholders with soft tokens; these constants are the ids it does that with. The
tokenizer's pieces for them, and the ids only text handling needs (BOS, EOS, turns), live in
`gemma3n.text.special_tokens`, which builds on these.
"""

PAD = 0
# "\n\n": the model inserts it before and after every image block.
DOUBLE_NEWLINE = 108
START_OF_IMAGE = 255999
END_OF_IMAGE = 256000
# Ids a tokenizer may produce beyond a small model's vocabulary: the image markers, which the
# model expands before anything is looked up in the embedding table.
IMAGE_MARKER_IDS = (START_OF_IMAGE, END_OF_IMAGE)

# The id of the soft-token slots of an image after the model expands each `<start_of_image>`
# into "\n\n <start_of_image> [256 slots] <end_of_image> \n\n". The model overwrites the slots'
# embeddings with the image's soft tokens and never looks them up in the embedding table. The id
# is negative so it can never collide with a vocabulary id and never comes out of a tokenizer.
IMAGE_PLACEHOLDER = -2
