"""Build the small synthetic data sets shipped with rawtune.

Running ``python core/demo_data/build.py`` writes four JSONL files next to
this script:

* ``sentiment.jsonl``      - 1,200 short movie reviews, ``{"text", "label"}``
  with label 1 = positive and 0 = negative (balanced, shuffled).
* ``sentiment_long.jsonl`` - 600 long reviews with the same schema, whose
  lengths follow a log-uniform spread of roughly 40 to 600 words; used to
  benchmark padding waste.
* ``qa.jsonl``             - 400 ``{"instruction", "input", "output"}`` rows
  from a few simple, deterministic task families, for the LoRA demo.
* ``chat.jsonl``           - 300 ``{"messages"}`` conversations of one to three
  exchanges on the same task families, some with a system prompt, some with a
  follow-up question that needs the turn before it, for the chat demo.

Everything is composed from the phrase pools below, written for this project,
so the data is small, licence-clean and needs no download. The generator uses
only the standard library and fixed seeds, so rerunning it reproduces the files
byte for byte. The reviews carry their signal in word choice, while negations
("not bad", "not great") and mixed reviews, where the closing verdict decides,
keep the task from being trivial.
"""

import json
import math
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

# --------------------------------------------------------------------------
# Phrase pools for the reviews
# --------------------------------------------------------------------------

TITLE_FIRST = [
    "The Glass", "Midnight", "The Last", "Paper", "Silver", "The Hollow",
    "Northern", "The Quiet", "Velvet", "Broken", "The Seventh", "Crimson",
    "The Lantern", "Distant", "Iron", "The Salt", "Amber", "The Painted",
]
TITLE_SECOND = [
    "Harbor", "Orchard", "Signal", "Kingdom", "Lighthouse", "Carnival",
    "Winter", "Comet", "Archive", "Tide", "Garden", "Cartographer",
    "Frontier", "Circus", "Station", "Meridian", "Weaver", "Avalanche",
]

FILM = ["film", "movie", "picture", "feature", "story"]

TOPICS = [
    "plot", "acting", "score", "pacing", "cinematography", "dialogue",
    "script", "editing", "soundtrack", "lead performance", "supporting cast",
    "ending", "opening scene", "screenplay", "direction", "camera work",
    "production design", "costume design", "visual effects", "third act",
    "character work", "lighting", "sound design", "villain", "chemistry",
]

POSITIVE = [
    "wonderful", "brilliant", "gripping", "moving", "superb", "charming",
    "delightful", "stunning", "clever", "heartfelt", "masterful", "elegant",
    "engaging", "gorgeous", "inventive", "thrilling", "tender", "sharp",
    "confident", "luminous", "memorable", "rich", "assured", "witty",
    "beautiful", "excellent", "powerful", "fresh", "lovely", "captivating",
]
NEGATIVE = [
    "dull", "clumsy", "tedious", "bland", "messy", "lifeless", "awkward",
    "forgettable", "shallow", "confusing", "sloppy", "flat", "tiresome",
    "boring", "weak", "lazy", "muddled", "stiff", "hollow", "predictable",
    "grating", "cheap", "overlong", "wooden", "disappointing", "dreary",
    "aimless", "terrible", "awful", "painful",
]
INTENSIFIERS = [
    "really", "truly", "remarkably", "genuinely", "incredibly", "deeply",
    "utterly", "thoroughly", "quite", "surprisingly", "consistently",
    "absolutely", "", "", "", "",
]
# Negated phrases flip the polarity of the adjective that follows them.
NEGATORS = [
    "not", "never", "hardly", "not at all", "far from", "not exactly",
    "not particularly", "anything but",
]

VERDICT = {
    1: [
        "I would happily watch it again.",
        "Highly recommended.",
        "Easily one of the best films I have seen this year.",
        "Go and see it on the biggest screen you can find.",
        "I left the cinema smiling.",
        "It earns every minute of its running time.",
        "A real treat from start to finish.",
        "Overall, a triumph.",
        "I cannot wait to see it again with friends.",
        "Worth every penny of the ticket.",
        "My verdict: a must-see.",
        "In the end, I loved it.",
        "All things considered, a rewarding watch.",
        "Ten out of ten would recommend.",
        "It stayed with me for days, in the best way.",
    ],
    0: [
        "I would not watch it again.",
        "Skip this one.",
        "Easily one of the worst films I have seen this year.",
        "Save your money and stay home.",
        "I left the cinema bored.",
        "It wastes nearly every minute of its running time.",
        "A chore from start to finish.",
        "Overall, a letdown.",
        "I checked my watch more than once.",
        "Not worth the price of the ticket.",
        "My verdict: avoid it.",
        "In the end, I disliked it.",
        "All things considered, a waste of an evening.",
        "I cannot recommend it to anyone.",
        "I had forgotten it by the next morning.",
    ],
}

# Neutral sentences: no polarity, they only add length and noise.
NEUTRAL = [
    "I saw it on a rainy Tuesday afternoon.",
    "The theatre was about half full.",
    "I went in knowing very little about it.",
    "It runs a little over two hours.",
    "My cousin had suggested it weeks ago.",
    "The trailer gives away a fair amount of the story.",
    "It is loosely based on an old stage play.",
    "The story follows a family over one long summer.",
    "Most of it takes place in a small coastal town.",
    "The director is best known for short documentaries.",
    "There is a brief scene after the credits.",
    "I watched it at home with the lights off.",
    "The setting moves between two cities.",
    "It is the second film in a planned trilogy.",
    "A few scenes were shot on actual trains.",
    "The cast is mostly made up of newcomers.",
    "The story is told partly in flashback.",
    "I had read the novel it borrows from.",
    "It opened quietly in only a few theatres.",
    "The main character is a retired clockmaker.",
]

# Openers and connectors used by the long, rambling reviews.
RAMBLE = [
    "Let me say a little more about the {topic}.",
    "I keep coming back to the {topic}.",
    "It is worth spending a moment on the {topic}.",
    "Then there is the {topic}.",
    "People will argue about the {topic} for a while.",
    "Another thing I noticed was the {topic}.",
]


def make_title(rng):
    return f"{rng.choice(TITLE_FIRST)} {rng.choice(TITLE_SECOND)}"


def adj_phrase(rng, words):
    """An adjective from ``words``, sometimes with an intensifier in front."""
    intens = rng.choice(INTENSIFIERS)
    adj = rng.choice(words)
    return f"{intens} {adj}" if intens else adj


def pool(polarity):
    return POSITIVE if polarity == 1 else NEGATIVE


def plain_sentence(rng, polarity, title):
    """A sentence whose adjective directly carries ``polarity``."""
    adj = adj_phrase(rng, pool(polarity))
    film = rng.choice(FILM)
    return rng.choice([
        f"The {rng.choice(TOPICS)} was {adj}.",
        f"The {rng.choice(TOPICS)} is {adj} throughout.",
        f"{title} is a {adj} {film}.",
        f"I found the {rng.choice(TOPICS)} {adj}.",
        f"What a {adj} {film}.",
        f"Honestly, the {rng.choice(TOPICS)} felt {adj}.",
        f"The {rng.choice(TOPICS)} and the {rng.choice(TOPICS)} are both {adj}.",
    ])


def negated_sentence(rng, polarity):
    """A sentence that negates an adjective of the opposite polarity."""
    adj = rng.choice(pool(1 - polarity))
    neg = rng.choice(NEGATORS)
    return rng.choice([
        f"The {rng.choice(TOPICS)} was {neg} {adj}.",
        f"I have to say the {rng.choice(TOPICS)} is {neg} {adj}.",
        f"This {rng.choice(FILM)} is {neg} {adj}.",
    ])


def mixed_sentence(rng, polarity):
    """Opposite praise or complaint first; the clause after it decides."""
    first = f"the {rng.choice(TOPICS)} was {adj_phrase(rng, pool(1 - polarity))}"
    second = f"the {rng.choice(TOPICS)} was {adj_phrase(rng, pool(polarity))}"
    return rng.choice([
        f"Sure, {first}, but {second}.",
        f"Although {first}, {second}.",
        f"I admit {first}; still, {second}.",
        f"Even if {first}, in the end {second}.",
    ])


def polar_sentence(rng, polarity, title):
    kind = rng.random()
    if kind < 0.55:
        return plain_sentence(rng, polarity, title)
    if kind < 0.8:
        return negated_sentence(rng, polarity)
    return mixed_sentence(rng, polarity)


def closing(rng, polarity):
    """The final verdict of a review; always has the review's polarity."""
    if rng.random() < 0.5:
        return rng.choice(VERDICT[polarity])
    return polar_sentence(rng, polarity, "It")


def body_sentence(rng, polarity, title, p_opposite, p_neutral):
    roll = rng.random()
    if roll < p_neutral:
        return rng.choice(NEUTRAL)
    if roll < p_neutral + p_opposite:
        return polar_sentence(rng, 1 - polarity, title)
    return polar_sentence(rng, polarity, title)


def short_review(rng, polarity):
    """1-4 sentences and 10-60 words; the last sentence gives the verdict."""
    while True:
        title = make_title(rng)
        n = rng.randint(1, 4)
        sentences = [
            body_sentence(rng, polarity, title, p_opposite=0.2, p_neutral=0.2)
            for _ in range(n - 1)
        ]
        if sentences and rng.random() < 0.5:
            sentences[0] = f"I finally watched {title}."
        sentences.append(closing(rng, polarity))
        text = " ".join(sentences)
        if 10 <= len(text.split()) <= 60:
            return text


def long_review(rng, polarity, min_words=40, max_words=600):
    """A rambling multi-paragraph review of log-uniform target length."""
    target = math.exp(rng.uniform(math.log(min_words), math.log(max_words)))
    title = make_title(rng)
    end = closing(rng, polarity)
    paragraphs = []
    paragraph = [f"I finally watched {title}."]
    count = len(paragraph[0].split()) + len(end.split())
    while count < target:
        if rng.random() < 0.25:
            sentence = rng.choice(RAMBLE).format(topic=rng.choice(TOPICS))
        else:
            sentence = body_sentence(rng, polarity, title,
                                     p_opposite=0.25, p_neutral=0.25)
        paragraph.append(sentence)
        count += len(sentence.split())
        if len(paragraph) >= rng.randint(4, 8):
            paragraphs.append(" ".join(paragraph))
            paragraph = []
    paragraph.append(end)
    paragraphs.append(" ".join(paragraph))
    return "\n\n".join(paragraphs)


def sentiment_rows(rng, n, make):
    """``n`` distinct reviews, half positive and half negative, shuffled."""
    labels = [1] * (n // 2) + [0] * (n // 2)
    rng.shuffle(labels)
    rows, seen = [], set()
    for label in labels:
        text = make(rng, label)
        while text in seen:
            text = make(rng, label)
        seen.add(text)
        rows.append({"text": text, "label": label})
    return rows


# --------------------------------------------------------------------------
# Instruction data
# --------------------------------------------------------------------------

# An invented atlas: nothing here refers to real places.
CAPITALS = {
    "Veloria": "Marrowgate", "Quendal": "Ostrevin", "Parvonia": "Lisk",
    "Tamberland": "Hollowmere", "Ezzaria": "Caldrun", "Norvenna": "Brisklow",
    "Sundaro": "Pellamy", "Krastovia": "Dunmoor", "Olvenia": "Thessaly Gate",
    "Marisco": "Vantor", "Bellowyn": "Glimmerford", "Zantheria": "Ruskin Bay",
    "Ostmarch": "Fennick", "Callowen": "Ambersea", "Drevania": "Kolvik",
    "Yssmere": "Tarnhold", "Pelloria": "Windrest", "Gorvath": "Ashby Cross",
    "Lunessa": "Corrowin", "Brakmoor": "Eldspire",
}

ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"),
    ("light", "dark"), ("happy", "sad"), ("early", "late"), ("open", "closed"),
    ("full", "empty"), ("strong", "weak"), ("old", "new"), ("wet", "dry"),
    ("loud", "quiet"), ("near", "far"), ("hard", "soft"), ("high", "low"),
    ("rich", "poor"), ("thick", "thin"), ("first", "last"), ("win", "lose"),
    ("push", "pull"), ("day", "night"), ("inside", "outside"), ("left", "right"),
]

WORDS = [
    "apple", "river", "stone", "cloud", "garden", "lamp", "window", "bread",
    "forest", "candle", "bridge", "mirror", "pencil", "ocean", "ladder",
    "violin", "pocket", "tiger", "rocket", "meadow", "button", "castle",
    "feather", "harbor", "jacket", "kettle", "lemon", "marble", "needle",
    "orange", "pepper", "quilt", "saddle", "tunnel", "wagon", "yarn",
]


def task_capital(rng):
    country = rng.choice(sorted(CAPITALS))
    return f"What is the capital of {country}?", "", CAPITALS[country]


def task_opposite(rng):
    pair = rng.choice(ANTONYMS)
    word, answer = pair if rng.random() < 0.5 else pair[::-1]
    return f"Give the opposite of the word '{word}'.", "", answer


def task_plus(rng):
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    return f"What is {a} plus {b}?", "", str(a + b)


def task_add(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return "Add the two numbers.", f"{a} and {b}", str(a + b)


def task_reverse(rng):
    words = rng.sample(WORDS, rng.randint(3, 8))
    return ("Reverse the order of these words.", " ".join(words),
            " ".join(reversed(words)))


def task_upper(rng):
    text = " ".join(rng.sample(WORDS, rng.randint(2, 6)))
    return "Convert the text to uppercase.", text, text.upper()


def task_sort_letters(rng):
    letters = rng.sample("abcdefghijklmnopqrstuvwxyz", rng.randint(4, 9))
    return ("Sort these letters alphabetically.", " ".join(letters),
            " ".join(sorted(letters)))


def task_count(rng):
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14)))
    return "Count the words.", text, str(len(text.split()))


NO_INPUT_TASKS = [task_capital, task_opposite, task_plus]
INPUT_TASKS = [task_add, task_reverse, task_upper, task_sort_letters, task_count]


def qa_rows(rng, n):
    """Half the rows come from tasks with an empty input, half with one."""
    rows = []
    for i in range(n):
        task = rng.choice(NO_INPUT_TASKS if i % 2 == 0 else INPUT_TASKS)
        instruction, input_text, output = task(rng)
        rows.append({"instruction": instruction, "input": input_text,
                     "output": output})
    rng.shuffle(rows)
    return rows


SYSTEM_PROMPTS = [
    "You are a concise assistant.",
    "Answer in as few words as possible.",
    "You help with small word and number puzzles.",
]


def question(instruction, input_text):
    """A task as a user would type it: the instruction, then its input."""
    return f"{instruction}\n\n{input_text}" if input_text else instruction


def exchanges(rng, n):
    """n (question, answer) pairs; after a capital, sometimes a follow-up
    ("And of X?") that only makes sense with the turn before it."""
    pairs, last_task = [], None
    for _ in range(n):
        if last_task is task_capital and rng.random() < 0.5:
            country = rng.choice(sorted(CAPITALS))
            pairs.append((f"And of {country}?", CAPITALS[country]))
            continue
        last_task = rng.choice(NO_INPUT_TASKS + INPUT_TASKS)
        instruction, input_text, output = last_task(rng)
        pairs.append((question(instruction, input_text), output))
    return pairs


def chat_rows(rng, n):
    """Conversations of 1-3 exchanges; about a third open with a system prompt."""
    rows = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.35:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for user, assistant in exchanges(rng, rng.randint(1, 3)):
            messages += [{"role": "user", "content": user},
                         {"role": "assistant", "content": assistant}]
        rows.append({"messages": messages})
    return rows


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------

def write_jsonl(name, rows):
    with open(HERE / name, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main():
    write_jsonl("sentiment.jsonl",
                sentiment_rows(random.Random(1234), 1200, short_review))
    write_jsonl("sentiment_long.jsonl",
                sentiment_rows(random.Random(5678), 600, long_review))
    write_jsonl("qa.jsonl", qa_rows(random.Random(91011), 400))
    write_jsonl("chat.jsonl", chat_rows(random.Random(121314), 300))


if __name__ == "__main__":
    main()
