"""The Gemma turn format, as text.

A conversation is a list of turns `(role, text)` with roles 'user' and 'model', starting with a
user turn and alternating. Each turn is written

    <start_of_turn>{role}\\n{text}<end_of_turn>\\n

and a prompt that asks the model to answer ends with `<start_of_turn>model\\n`. BOS is not part
of the text: add it as an id (`Tokenizer.encode(..., add_bos=True)`).

Multi-turn chat with a KV cache feeds the conversation turn by turn, as these token streams:

    turn 1:   [BOS] + encode(format_user_turn(message_1))
    answer 1: the sampled answer ids, then the END_OF_TURN id that stopped sampling
    turn 2:   encode(format_continuation(message_2))
    answer 2: ...

The answer stops at `<end_of_turn>`, which must stay in the history (fed into the cache; a
sampler that does not feed its stop token must prepend the END_OF_TURN id to turn 2). Turn 2 then
starts with the "\\n" that closes the model's turn. `<start_of_turn>`/`<end_of_turn>` are atomic
pieces, so no SentencePiece merge crosses them; the concatenated streams therefore equal
`[BOS] + encode(format_conversation(turns))` whenever each answer's ids are the tokenization of
its text and the "\\n" before each answer does not merge with the answer's first characters
(guaranteed when "\\n" is an atomic piece, as in the packaged tokenizer).

Example:
    >>> format_user_turn("Hi")
    '<start_of_turn>user\\nHi<end_of_turn>\\n<start_of_turn>model\\n'
    >>> format_conversation([("user", "Hi"), ("model", "Hello!")], add_generation_prompt=False)
    '<start_of_turn>user\\nHi<end_of_turn>\\n<start_of_turn>model\\nHello!<end_of_turn>\\n'
"""

from collections.abc import Sequence

from gemma3n.text.special_tokens import (END_OF_TURN_PIECE, START_OF_IMAGE_PIECE,
                                         START_OF_TURN_PIECE)

USER_ROLE = "user"
MODEL_ROLE = "model"
ROLES = (USER_ROLE, MODEL_ROLE)
# What follows the model's `<end_of_turn>` in the history before the next turn starts.
TURN_SEPARATOR = "\n"
# The text after which the model writes its answer.
GENERATION_PROMPT = f"{START_OF_TURN_PIECE}{MODEL_ROLE}\n"


def format_turn(role: str, text: str) -> str:
    """Returns one closed turn: `<start_of_turn>{role}\\n{text}<end_of_turn>\\n`."""
    if role not in ROLES:
        raise ValueError(f"unknown chat role {role!r}; roles are {ROLES}")
    return f"{START_OF_TURN_PIECE}{role}\n{text}{END_OF_TURN_PIECE}{TURN_SEPARATOR}"


def format_user_turn(text: str) -> str:
    """Returns the prompt text of a single user message, ready for the model's answer."""
    return format_turn(USER_ROLE, text) + GENERATION_PROMPT


def format_continuation(text: str) -> str:
    """Returns the text that a multi-turn chat feeds for its next user message.

    The history already ends with the model's answer and its `<end_of_turn>`: the continuation
    closes that turn with "\\n", then adds the user turn and the generation prompt.
    """
    return TURN_SEPARATOR + format_user_turn(text)


def add_image_markers(text: str, num_images: int, piece: str = START_OF_IMAGE_PIECE,
                      what: str = 'images') -> str:
    """`text` with one `piece` (`<start_of_image>`, or `<start_of_audio>` with `what='audio
    clips'`) per item: the user's own markers, else put in front."""
    markers = text.count(piece)
    if markers == 0:
        return piece * num_images + text
    if markers != num_images:
        raise ValueError(f'the prompt has {markers} {piece} markers but '
                         f'{num_images} {what} were given')
    return text


def format_conversation(turns: Sequence[tuple[str, str]],
                        add_generation_prompt: bool = True) -> str:
    """Returns the text of a whole conversation of `(role, text)` turns.

    Turns alternate, starting with 'user'. With `add_generation_prompt` the last turn must be a
    user turn and the text ends with `<start_of_turn>model\\n`, ready for the model's answer.
    """
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    for index, (role, _) in enumerate(turns):
        expected = ROLES[index % len(ROLES)]
        if role != expected:
            raise ValueError(
                f"turn {index} has role {role!r} but turns must alternate "
                f"{USER_ROLE!r}, {MODEL_ROLE!r}, ... starting with {USER_ROLE!r}")
    if add_generation_prompt and turns[-1][0] != USER_ROLE:
        raise ValueError("add_generation_prompt needs the last turn to be a user turn")
    text = "".join(format_turn(role, turn_text) for role, turn_text in turns)
    return text + GENERATION_PROMPT if add_generation_prompt else text
