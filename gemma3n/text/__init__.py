"""Text in and out of Gemma 3n: tokenizer, chat format, streaming detokenizer."""

from gemma3n.text import special_tokens
from gemma3n.text.chat_format import format_continuation
from gemma3n.text.chat_format import format_conversation
from gemma3n.text.chat_format import format_turn
from gemma3n.text.chat_format import format_user_turn
from gemma3n.text.tokenizer import StreamDecoder
from gemma3n.text.tokenizer import Tokenizer
from gemma3n.text.tokenizer import default_tokenizer_path
from gemma3n.engine.sampling import Greedy, RandomSampling, TopkSampling, TopPSampling
from gemma3n.text.sampler import Sampler, SamplerOutput, SamplerState
from gemma3n.text.chat import ChatSampler

__all__ = [
    "ChatSampler",
    "Greedy",
    "RandomSampling",
    "Sampler",
    "SamplerOutput",
    "SamplerState",
    "TopPSampling",
    "TopkSampling",
    "StreamDecoder",
    "Tokenizer",
    "default_tokenizer_path",
    "format_continuation",
    "format_conversation",
    "format_turn",
    "format_user_turn",
    "special_tokens",
]
