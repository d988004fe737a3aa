"""Builds gemma3n/assets/tokenizer.model, the tiny SentencePiece model shipped in the package.

The training text is generated here from hand-written word lists and sentence templates (no
third-party text), so the asset can be shipped freely and rebuilt byte for byte:

    python tools/train_tiny_tokenizer.py [--output gemma3n/assets/tokenizer.model]

The model is a byte-fallback BPE model (any text round-trips) laid out like the Gemma 3n
vocabulary at its low ids: <pad>, <eos>, <bos>, <unk> at 0..3, filler pieces <unused0>.. up to
<start_of_turn> = 105, <end_of_turn> = 106, "\\n" = 107, "\\n\\n" = 108. <start_of_image> and
<end_of_image> follow at 109 and 110; `gemma3n.text.Tokenizer` speaks them as 255999 and 256000.
"""

import argparse
import io
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from gemma3n.text import chat_format
from gemma3n.layers import special_ids as sid
from gemma3n.text import special_tokens as st

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "gemma3n" / "assets" / "tokenizer.model"
VOCAB_SIZE = 4096
NUM_SENTENCES = 30_000
SEED = 0
# Pieces longer than this would only memorise whole template phrases.
MAX_PIECE_LENGTH = 16
NEWLINE_PIECE = "\n"

# SentencePiece puts <pad>, <eos>, <bos>, <unk> first, then the user-defined symbols in order.
_NUM_CONTROL_PIECES = 4
_UNUSED_PIECES = [f"<unused{i}>" for i in range(st.START_OF_TURN - _NUM_CONTROL_PIECES)]
USER_DEFINED_SYMBOLS = (
    *_UNUSED_PIECES,
    st.START_OF_TURN_PIECE,
    st.END_OF_TURN_PIECE,
    NEWLINE_PIECE,
    st.DOUBLE_NEWLINE_PIECE,
    st.START_OF_IMAGE_PIECE,
    st.END_OF_IMAGE_PIECE,
)

NAMES = """Ada Alan Amara Ana Anders Aria Arjun Ben Bianca Carlos Chen Chloe Dara David Diego Elena
Emma Erik Fatima Felix Grace Hana Hugo Ines Isaac Ivan Jack Jamal Jana Jonas Julia Kai Kenji Lara
Leo Lina Lucas Maya Mei Mina Nadia Noah Nora Olga Omar Oscar Paula Pedro Priya Quinn Rafael Rosa
Ruth Sam Sara Sofia Tariq Theo Uma Vera Victor Wei Yara Yusuf Zoe""".split()

PLACES = """Lisbon Oslo Nairobi Lima Kyoto Cairo Dublin Quebec Seoul Hanoi Prague Vienna Madrid
Berlin Chicago Denver Sydney Auckland Toronto Mumbai Istanbul Bogota Santiago Helsinki Reykjavik
Marseille Naples Krakow Tunis Accra Manila Jakarta Perth Glasgow Bristol Geneva Zurich Porto
Valencia Bergen""".split()

NOUNS = """apple bag ball bank basket beach bear bed bell bench bicycle bird boat book bottle box
bread bridge brother brush bucket cake camera candle car card carpet castle cat chair cheese
child church city clock cloud coat coffee computer cookie corner cow cup curtain desk dinner
doctor dog door dragon dream drum egg engine farm farmer field fire fish flag floor flower
forest fork friend frog garden gate gift glass glove goat guitar hammer hat heart hill horse
hospital house island jacket jar key kitchen kite knife ladder lake lamp leaf lemon letter
library light lion map market mirror monkey moon morning mountain mouse museum nest newspaper
night notebook ocean office onion orange painter paper park pencil pepper piano picture pillow
pilot plane plant plate pocket pond potato queen rabbit radio rain river road robot rock roof
room rope sailor sand school scientist sea shadow sheep shelf ship shirt shoe shop singer sister
sky snow soup spoon star station stone storm street student sun table teacher teapot tent
window tiger toast tomato tower town toy train tree truck turtle umbrella valley village violin
wall watch water whale wheel wind wolf writer yard zebra answer question idea problem story
reason result method system network program server memory signal number pattern language
message window summer winter autumn spring weekend holiday journey lesson recipe festival
meeting concert garden planet galaxy engineer musician gardener library tunnel harbor canal
lighthouse orchard meadow desert glacier volcano canyon cliff cave puzzle riddle mystery""".split()

IRREGULAR_PLURALS = {
    "child": "children", "mouse": "mice", "sheep": "sheep", "knife": "knives", "leaf": "leaves",
    "wolf": "wolves", "shelf": "shelves", "fish": "fish", "potato": "potatoes",
    "tomato": "tomatoes", "volcano": "volcanoes",
}

# (base, third person, past, present participle)
VERBS = [
    ("ask", "asks", "asked", "asking"), ("bake", "bakes", "baked", "baking"),
    ("bring", "brings", "brought", "bringing"), ("build", "builds", "built", "building"),
    ("buy", "buys", "bought", "buying"), ("carry", "carries", "carried", "carrying"),
    ("catch", "catches", "caught", "catching"), ("choose", "chooses", "chose", "choosing"),
    ("clean", "cleans", "cleaned", "cleaning"), ("climb", "climbs", "climbed", "climbing"),
    ("close", "closes", "closed", "closing"), ("cook", "cooks", "cooked", "cooking"),
    ("count", "counts", "counted", "counting"), ("cross", "crosses", "crossed", "crossing"),
    ("draw", "draws", "drew", "drawing"), ("drink", "drinks", "drank", "drinking"),
    ("drive", "drives", "drove", "driving"), ("eat", "eats", "ate", "eating"),
    ("explain", "explains", "explained", "explaining"), ("find", "finds", "found", "finding"),
    ("fix", "fixes", "fixed", "fixing"), ("follow", "follows", "followed", "following"),
    ("forget", "forgets", "forgot", "forgetting"), ("give", "gives", "gave", "giving"),
    ("grow", "grows", "grew", "growing"), ("help", "helps", "helped", "helping"),
    ("hide", "hides", "hid", "hiding"), ("hold", "holds", "held", "holding"),
    ("jump", "jumps", "jumped", "jumping"), ("keep", "keeps", "kept", "keeping"),
    ("know", "knows", "knew", "knowing"), ("learn", "learns", "learned", "learning"),
    ("leave", "leaves", "left", "leaving"), ("like", "likes", "liked", "liking"),
    ("listen to", "listens to", "listened to", "listening to"),
    ("look at", "looks at", "looked at", "looking at"), ("lose", "loses", "lost", "losing"),
    ("make", "makes", "made", "making"), ("measure", "measures", "measured", "measuring"),
    ("move", "moves", "moved", "moving"), ("need", "needs", "needed", "needing"),
    ("open", "opens", "opened", "opening"), ("paint", "paints", "painted", "painting"),
    ("pick", "picks", "picked", "picking"), ("plant", "plants", "planted", "planting"),
    ("play", "plays", "played", "playing"), ("pull", "pulls", "pulled", "pulling"),
    ("push", "pushes", "pushed", "pushing"), ("read", "reads", "read", "reading"),
    ("remember", "remembers", "remembered", "remembering"),
    ("repair", "repairs", "repaired", "repairing"), ("see", "sees", "saw", "seeing"),
    ("sell", "sells", "sold", "selling"), ("send", "sends", "sent", "sending"),
    ("share", "shares", "shared", "sharing"), ("show", "shows", "showed", "showing"),
    ("sing", "sings", "sang", "singing"), ("sort", "sorts", "sorted", "sorting"),
    ("study", "studies", "studied", "studying"), ("take", "takes", "took", "taking"),
    ("teach", "teaches", "taught", "teaching"), ("throw", "throws", "threw", "throwing"),
    ("touch", "touches", "touched", "touching"), ("visit", "visits", "visited", "visiting"),
    ("wash", "washes", "washed", "washing"), ("watch", "watches", "watched", "watching"),
    ("write", "writes", "wrote", "writing"), ("describe", "describes", "described", "describing"),
    ("compare", "compares", "compared", "comparing"),
    ("answer", "answers", "answered", "answering"),
    ("discover", "discovers", "discovered", "discovering"),
    ("translate", "translates", "translated", "translating"),
    ("summarize", "summarizes", "summarized", "summarizing"),
    ("calculate", "calculates", "calculated", "calculating"),
    ("imagine", "imagines", "imagined", "imagining"),
    ("design", "designs", "designed", "designing"),
]

INTRANSITIVE_VERBS = [
    ("arrive", "arrives", "arrived", "arriving"), ("laugh", "laughs", "laughed", "laughing"),
    ("sleep", "sleeps", "slept", "sleeping"), ("run", "runs", "ran", "running"),
    ("swim", "swims", "swam", "swimming"), ("wait", "waits", "waited", "waiting"),
    ("walk", "walks", "walked", "walking"), ("dance", "dances", "danced", "dancing"),
    ("smile", "smiles", "smiled", "smiling"), ("travel", "travels", "traveled", "traveling"),
    ("rest", "rests", "rested", "resting"), ("work", "works", "worked", "working"),
    ("shine", "shines", "shone", "shining"), ("fly", "flies", "flew", "flying"),
    ("listen", "listens", "listened", "listening"), ("think", "thinks", "thought", "thinking"),
]

ADJECTIVES = """big small tall short long wide narrow old young new ancient modern quiet loud
bright dark warm cold hot cool soft hard heavy light quick slow happy sad calm brave gentle
clever kind curious friendly busy lazy proud shy polite strange simple famous careful honest
clean dirty empty full fresh dry wet sweet sour bitter salty green blue red yellow purple orange
brown white black golden silver wooden round square sharp smooth rough tiny huge early late
strong weak rich poor cheap expensive easy difficult useful important beautiful lovely pleasant
wonderful terrible noisy sleepy hungry thirsty tired healthy sunny rainy windy cloudy snowy
foggy frozen shiny dusty hidden secret open private public local distant nearby""".split()

ADVERBS = """quickly slowly quietly loudly carefully happily sadly gently bravely calmly easily
rarely often always never sometimes usually seldom finally suddenly nearly almost really very
quite rather early later soon today tomorrow yesterday together alone outside inside upstairs
downstairs""".split()

PREPOSITIONS = """in on under over near behind beside between inside outside across along
around through past toward""".split()

TIMES = """in the morning|at night|after lunch|before dinner|on Monday|on Tuesday|on Wednesday|
on Thursday|on Friday|on Saturday|on Sunday|in January|in February|in March|in April|in May|
in June|in July|in August|in September|in October|in November|in December|every day|
last week|next year|at noon|at dawn|at sunset|during the winter|during the summer""".replace(
    "\n", "").split("|")

ACCENTED_WORDS = """café naïve résumé façade jalapeño crème brûlée piñata fiancée déjà
vu señor über Zürich Málaga São Paulo Kraków Reykjavík""".split()

TEMPLATES = [
    "The {adj} {noun} {verb_past} the {noun2}.",
    "{Name} {verb_past} a {adj} {noun} {time}.",
    "{Name} and {Name2} {verb_past} the {noun} {prep} the {noun2}.",
    "My {noun} is {adv} {adj}.",
    "Why does the {noun} {verb} the {noun2}?",
    "Can you {verb} the {adj} {noun} for me, please?",
    "I think the {noun} is {adj}, but the {noun2} is {adj2}.",
    "There are {number} {nouns} {prep} the {noun2}.",
    "{Name} {intransitive_past} {adv} {prep} the {noun}.",
    "We {verb_past} {number} {nouns} in {place} {time}.",
    "Is it true that {nouns} {verb} {nouns2}?",
    "The {noun} was {adj} and {adj2}, so {name_or_we} {intransitive_past}.",
    "{Name} is {verb_ing} a {noun} {prep} the {adj} {noun2}.",
    "How many {nouns} did {Name} {verb} {time}?",
    "In {place}, people {adv} {verb} {nouns}.",
    "\"{Greeting}, {Name}!\" said {Name2}.",
    "If the {noun} is {adj}, {verb} it {adv}.",
    "Step {number}: {verb} the {noun} and {verb2} the {noun2}.",
    "Please {verb} {number} {nouns} before {time_of_day}.",
    "The {noun} costs {price} dollars, and the {noun2} costs {price2}.",
    "{Name} was born on {month} {day}, {year}, in {place}.",
    "Meet me at {hour}:{minute} near the {adj} {noun}.",
    "The answer is {sum} because {number2} plus {number3} is {sum}.",
    "- {adj} {nouns}\n- {adj2} {nouns2}\n- {nouns3}",
    "Q: What did {Name} {verb}?\nA: {Name} {verb_past} the {noun}.",
    "{Name} said: {quote}",
    "Note: the {noun} and the {noun2} are {adj}; the {noun3} is not.",
    "Today in {place} it is {adj_weather} and {temperature} degrees.",
    "The {noun} {verb_3rd} the {noun2} while the {noun3} {intransitive_3rd}.",
    "First {verb} the {noun}, then {verb2} the {noun2}, and finally {verb3} the {noun3}.",
    "{Name} likes {nouns}, {nouns2}, and {adj} {nouns3}.",
    "Could you {verb} this {noun}? It is {adv} {adj}.",
    "Sure! Here is a {adj} {noun}: the {noun2} {verb_3rd} the {noun3}.",
    "Thank you, {Name}. The {noun} looks {adj}.",
    "We ordered a {accented} at the {adj} {noun} in {place}.",
    "def {snake}({arg}):\n    return {arg} * {number}",
    "{Name} visited {place} in {year} and {verb_past} a {adj} {noun}.",
    "The {nouns} are {verb_ing} {adv}, and the {noun} {intransitive_3rd}.",
    "{Name}'s {noun} isn't {adj}; it's {adj2}.",
    "Don't {verb} the {noun}! It's {adj}.",
]

GREETINGS = ["Hello", "Hi", "Good morning", "Good evening", "Welcome", "Goodbye", "Thanks"]
QUOTES = [
    "\"I will {verb} the {noun} tomorrow.\"",
    "\"The {noun} is {adj} today!\"",
    "\"Where is my {adj} {noun}?\"",
    "\"Let's {verb} the {nouns} together.\"",
]
WEATHER = ["sunny", "rainy", "windy", "cloudy", "snowy", "foggy", "warm", "cold", "hot", "mild"]
MONTHS = """January February March April May June July August September October November
December""".split()
USER_REQUESTS = [
    "Write a short poem about a {adj} {noun}.",
    "Explain why the {noun} is {adj}.",
    "What is the capital of the {adj} {noun}?",
    "Tell me a story about {Name} and a {noun}.",
    "How do I {verb} a {noun}?",
    "Translate \"{adj} {noun}\" into French.",
    "Summarize this: {sentence}",
    "Give me {number} ideas for a {adj} {noun}.",
    "Hi! Can you help me {verb} my {noun}?",
    "What is {number} times {number2}?",
]
MODEL_ANSWERS = [
    "Sure! {sentence}",
    "Of course. {sentence} {sentence2}",
    "Here is one idea: {sentence}",
    "Good question. {sentence}",
    "I am not sure, but {sentence_lower}",
    "{sentence} Let me know if you need more help.",
]


class _CorpusWriter:
    """Fills sentence templates with random words from the lists above."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def _pick(self, items: Sequence[str]) -> str:
        return self._rng.choice(items)

    def _noun_plural(self) -> str:
        noun = self._pick(NOUNS)
        if noun in IRREGULAR_PLURALS:
            return IRREGULAR_PLURALS[noun]
        if noun.endswith(("s", "sh", "ch", "x")):
            return noun + "es"
        if noun.endswith("y") and noun[-2] not in "aeiou":
            return noun[:-1] + "ies"
        return noun + "s"

    def _number(self) -> str:
        # Mostly small counts, sometimes larger or decimal numbers.
        kind = self._rng.random()
        if kind < 0.6:
            return str(self._rng.randint(2, 12))
        if kind < 0.9:
            return str(self._rng.randint(13, 5000))
        return f"{self._rng.randint(0, 99)}.{self._rng.randint(0, 99):02d}"

    def _fields(self) -> dict[str, str]:
        pick = self._pick
        verb, verb2, verb3 = (self._rng.choice(VERBS) for _ in range(3))
        intransitive = pick(INTRANSITIVE_VERBS)
        number2, number3 = self._rng.randint(1, 50), self._rng.randint(1, 50)
        name = pick(NAMES)
        return {
            "adj": pick(ADJECTIVES), "adj2": pick(ADJECTIVES), "adv": pick(ADVERBS),
            "noun": pick(NOUNS), "noun2": pick(NOUNS), "noun3": pick(NOUNS),
            "nouns": self._noun_plural(), "nouns2": self._noun_plural(),
            "nouns3": self._noun_plural(),
            "verb": verb[0], "verb2": verb2[0], "verb3": verb3[0], "verb_3rd": verb[1],
            "verb_past": verb[2], "verb_ing": verb[3],
            "intransitive_3rd": intransitive[1], "intransitive_past": intransitive[2],
            "Name": name, "Name2": pick(NAMES), "name_or_we": pick([name, "we", "they", "I"]),
            "place": pick(PLACES), "prep": pick(PREPOSITIONS), "time": pick(TIMES),
            "time_of_day": pick(["noon", "midnight", "sunrise", "dinner", "Friday"]),
            "number": self._number(), "number2": str(number2), "number3": str(number3),
            "sum": str(number2 + number3),
            "price": f"{self._rng.randint(1, 300)}.{self._rng.randint(0, 99):02d}",
            "price2": str(self._rng.randint(1, 900)),
            "month": pick(MONTHS), "day": str(self._rng.randint(1, 28)),
            "year": str(self._rng.randint(1900, 2030)),
            "hour": str(self._rng.randint(1, 12)), "minute": f"{self._rng.randint(0, 59):02d}",
            "Greeting": pick(GREETINGS), "adj_weather": pick(WEATHER),
            "temperature": str(self._rng.randint(-10, 35)), "accented": pick(ACCENTED_WORDS),
            "snake": f"{verb[0].split()[0]}_{pick(NOUNS)}", "arg": pick(["x", "value", "count"]),
        }

    def _fill(self, template: str) -> str:
        fields = self._fields()
        fields["quote"] = self._pick(QUOTES).format(**fields)
        return template.format(**fields)

    def sentence(self) -> str:
        return self._fill(self._pick(TEMPLATES))

    def chat(self) -> str:
        """A one- or two-exchange conversation in the Gemma turn format."""
        turns = []
        for _ in range(self._rng.randint(1, 2)):
            request = self._fill(self._pick(USER_REQUESTS).replace("{sentence}", self.sentence()))
            first, second = self.sentence(), self.sentence()
            answer = self._pick(MODEL_ANSWERS).format(
                sentence=first, sentence2=second, sentence_lower=first[0].lower() + first[1:])
            turns += [(chat_format.USER_ROLE, request), (chat_format.MODEL_ROLE, answer)]
        return chat_format.format_conversation(turns, add_generation_prompt=False)


def build_corpus(num_sentences: int = NUM_SENTENCES, seed: int = SEED) -> list[str]:
    """Returns `num_sentences` generated training texts (a tenth of them chat transcripts)."""
    writer = _CorpusWriter(random.Random(seed))
    return [writer.chat() if i % 10 == 0 else writer.sentence() for i in range(num_sentences)]


def train_tokenizer(sentences: Iterable[str], vocab_size: int = VOCAB_SIZE,
                    user_defined_symbols: Sequence[str] = USER_DEFINED_SYMBOLS,
                    **trainer_overrides: object) -> bytes:
    """Trains the byte-fallback BPE SentencePiece model; returns the serialized model file.

    `trainer_overrides` replace SentencePiece trainer options (tests use them to build variants).
    """
    options = dict(
        model_type="bpe",
        vocab_size=vocab_size,
        # The corpus may not support vocab_size merges; stop early rather than fail.
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=1.0,
        pad_id=sid.PAD, eos_id=st.EOS, bos_id=st.BOS, unk_id=st.UNK,
        pad_piece=st.PAD_PIECE, eos_piece=st.EOS_PIECE, bos_piece=st.BOS_PIECE,
        unk_piece=st.UNK_PIECE,
        user_defined_symbols=list(user_defined_symbols),
        # Like Gemma's tokenizer: text is kept as written, spaces included.
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentencepiece_length=MAX_PIECE_LENGTH,
        # One thread and no sentence sampling make the output reproducible.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    options.update(trainer_overrides)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, **options)
    return model.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    model = train_tokenizer(build_corpus())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(model)
    vocab_size = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    print(f"wrote {args.output}: {len(model)} bytes, {vocab_size} pieces")


if __name__ == "__main__":
    main()
