"""RULER-style synthetic long-context tasks, made for a byte-level retrieval model.

Every prompt is ASCII, so for the byte-level reference model its length in
tokens is its length in UTF-8 bytes (plus <s>). ``generate(task, length, seed,
haystack)`` returns a :class:`Sample` whose prompt is within 3% of ``length``
bytes and ends with an answer prefix that repeats the wording of the retrieved
fact, so that the answer can be learned as a copy. ``generate_in_tokens(task,
length, seed, encode, haystack)`` fits a prompt to ``length`` tokens of another
tokenizer (see its docstring).

Tasks (answer prefix shown after "->"):

- ``single_needle``: one needle "The magic number for dorvex-tamil is 4831907."
  in the haystack -> "Answer: The magic number for dorvex-tamil is "
- ``multi_key``: four needles with different keys, one of them asked
  -> "Answer: The magic number for dorvex-tamil is "
- ``multi_value``: four needles with the same key; all values, in order of
  appearance -> "Answer: The magic numbers for dorvex-tamil are "
- ``multi_query``: four needles, two keys asked; their values in asked order
  -> "Answer: The magic numbers for dorvex-tamil and pelu-stramik are "
- ``variable_tracking``: two chains "VAR ABCDE = 4831907." ... "VAR FGHIJ = VAR
  ABCDE." scattered in order; the last variable of one chain is asked and the
  answer traces its chain back to the value, in the statements' own words
  -> "Answer: VAR KLMNO = VAR " then "FGHIJ = VAR ABCDE = 4831907" (five
  hops for a chain of five). Each hop is a lookup of the name just written.
- ``multi_doc_qa``: one document per ~400 bytes (tokens, fitted to a tokenizer)
  of the requested length, at least three ("Document 3:\\n
  About the Velmora guild\\n<sentences with one fact>\\n\\n"), each with one fact
  (founder, city, leader or flagship) about its own organization; one is asked
  -> "Answer: The founder of the Velmora guild is "
- ``multi_doc_qa_2hop``: "Tarsic Omblen works for the Velmora guild." and "The
  Velmora guild is based in the city of Kordan." in two documents, among
  distractor documents holding the same kinds of facts about others; asked for
  the city, the answer states both facts, the bridge first
  -> "Answer: Tarsic Omblen works for " then "the Velmora guild. The Velmora
  guild is based in the city of Kordan"

Both multi-hop tasks have the model write out each hop. The first versions
asked for the hops' results only: RULER's "which variables hold this value"
(each hop copies the name written *before* a match) and the city alone (two
lookups in one step); the 12M-parameter reference model scored 0.42-0.45 and
0.15-0.45 on them after 31.5 minutes of training, while every written-out
lookup task scored 0.85 or more.

Haystacks (``HAYSTACKS``; needles, facts and questions are the same in both):

- ``syllable`` (the default, what the reference model was trained on): generated
  per sample from templates over invented syllable words.
- ``pydoc``: real English, the prose of the Python documentation that every
  CPython carries (``pydoc_data.topics``, about 465 KB). ``pydoc_sentences()``
  keeps the sentences of its topics, in sorted topic order, that look like
  prose: starting with a capital and ending with a period after a word, 30-300
  bytes, quotes and parentheses balanced, and with no digits, "VAR", ``>>>``,
  non-ASCII character or markup (``[]`|\\{}#~^``); emphasis stars are dropped,
  typographic quotes made ASCII and hyphens made spaces ("built in"). About 190
  KB remain (187-200 KB on CPython 3.10-3.13), enough for ~40K tokens of a BPE
  tokenizer without a repeat. A
  sample reads consecutive sentences, as a document flows, from a seed-chosen
  sentence on, wrapping around at the end; the documents tasks' documents read
  on from each other, under their own headers (only the syllable filler tells
  about a document's subject). Invented words never equal a corpus word.
  ``pydoc_data`` changes between CPython releases (patch releases too), so a
  pydoc sample is reproducible on the same release only: the digest of the
  cleaned sentences (``corpus_digest()``) seeds the sample's random source, so
  another corpus gives other samples altogether, whose answers differ, and
  ``sagekv eval`` refuses to add them to a results directory made with another
  (the answers it holds no longer match).

Neither haystack contains digits (numbers are spelled out) or hyphens, so the
7-digit needle values and the hyphenated keys occur only in needles and
questions. Every invented word, key and value is distinct within a sample. The shortest
accepted lengths are in ``MIN_LENGTH`` (384 bytes for single_needle, else 512).

Seeds: ``EVAL_SEEDS = range(0, 1_000_000)`` and ``TRAIN_SEEDS = range(1_000_000,
2**31)`` never overlap; ``split_of(seed)`` says which one a seed belongs to.
``generate`` accepts any non-negative seed; the split is a convention for
callers. Samples are identical on every machine and Python version: the random
source is ``random.Random`` seeded with a string built from (task, length, seed)
and only its ``random()`` method, whose sequence Python keeps stable, is used
(pydoc samples: on the same corpus, see above).

Scoring (``score(sample, text)`` in [0, 1]): single-answer tasks score 1.0 iff
the text, without leading whitespace, starts with ``sample.answer`` followed by
a non-alphanumeric character or the end (for multi_doc_qa_2hop the answer is
both facts, so both hops must be right); multi-answer tasks score the fraction
of ``sample.answers`` found in the text as whole tokens.
"""

import dataclasses
import functools
import hashlib
import random
import re
from dataclasses import dataclass

from .errors import SageKVError

EVAL_SEEDS = range(0, 1_000_000)
TRAIN_SEEDS = range(1_000_000, 2**31)
DEFAULT_HAYSTACK = "syllable"
HAYSTACKS = (DEFAULT_HAYSTACK, "pydoc")
TOLERANCE = 0.03  # of the requested length, bytes or tokens


@dataclass(frozen=True)
class Sample:
    task: str
    length: int  # requested prompt length in bytes (generate_in_tokens: tokens); the prompt is within 3% of it
    seed: int
    prompt: str
    answer: str  # exactly what the model should write right after the prompt
    answers: tuple[str, ...]  # the items `score` looks for in the generation
    documents: tuple[str, ...]  # multi_doc tasks only: prompt == "".join(documents) + question
    question: str  # the prompt's suffix after the context, ending with the answer prefix
    haystack: str = DEFAULT_HAYSTACK


ONSETS = list("bdfgklmnprstvz") + ["br", "st", "tr", "sh"]
VOWELS = list("aeiou") + ["ai", "ou"]
CODAS = ["", "", "", "", "n", "r", "l", "s", "x", "m"]
ADJECTIVES = ("quiet amber hollow restless silver narrow ancient gentle crooked bright "
              "heavy distant pale stubborn tiny patient golden muddy broken curious").split()
VERBS = ("carried painted followed repaired traded buried counted watched borrowed "
         "measured polished gathered mended sold guarded described").split()
INTRANSITIVE = "wandered rested sang waited vanished returned drifted slept argued laughed".split()
ADVERBS = "slowly quietly carefully twice again loudly happily rarely".split()
PREPOSITIONS = "near beside behind across under around beyond inside".split()
TIMES = ["at dawn", "every winter", "after the harvest", "before the long rain", "late at night",
         "during the festival", "on the third morning", "once a year", "in the old days"]
CONNECTORS = ["later,", "meanwhile,", "even so,", "for a while,", "in the end,", "by then,"]
HAYSTACK_TEMPLATES = [
    "the {adj} {noun} {verb} the {noun} {prep} {place} {time}.",
    "{time}, a {noun} from {place} {verb} {num} {nouns}.",
    "in {place}, people say that the {noun} {intrans} {adv}.",
    "{num} {adj} {nouns} {intrans} {prep} the {noun}, and the {noun} {intrans} {time}.",
    "nobody in {place} remembers why {name} {verb} the {adj} {noun}.",
    "the {noun} was {adj}.",
    "{name} {intrans}.",
    "{place} has {num} {nouns} and {num} {adj} {nouns}.",
    "{conn} {name} {verb} the {adj} {noun} and {intrans} {adv}.",
    "{name} and {name} {intrans} {prep} {place} {time}, talking about the {noun}.",
    "when the {noun} {intrans}, the {adj} {nouns} of {place} {verb} the {noun} {adv}.",
    "it took {num} days to reach {place} by the {adj} road.",
    "{name} once {verb} {num} {nouns} {prep} the old {noun}.",
]
SUBJECT_TEMPLATES = [  # filler about a document's own entity
    "{subject} {verb} the {adj} {noun} {time}.",
    "many people in {place} remember when {subject} {intrans} {adv}.",
    "{subject} {intrans} {prep} {place} {time}.",
    "for {num} years, {subject} {verb} {nouns} {prep} the {noun}.",
]
ORG_KINDS = "guild company society league order council collective".split()
ORG_FACTS = [  # (fact, question, kind of value); the answer prefix is the fact up to its value
    ("The founder of {e} is {v}.", "Who is the founder of {e}?", "person"),
    ("{E} is based in the city of {v}.", "In which city is {e} based?", "name"),
    ("The current leader of {e} is {v}.", "Who is the current leader of {e}?", "person"),
    ("The flagship of {e} is named {v}.", "What is the flagship of {e} named?", "name"),
]
ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
ENGLISH_WORDS = set(re.findall(r"[a-z]+", " ".join(
    ADJECTIVES + VERBS + INTRANSITIVE + ADVERBS + PREPOSITIONS + TIMES + CONNECTORS
    + HAYSTACK_TEMPLATES + SUBJECT_TEMPLATES + ORG_KINDS + ONES + TENS + [f[0] for f in ORG_FACTS])))
DANGLING = {"the", "a", "and", "of", "by", "to", "that", "why"}
NEEDLES = 4
CHAIN_LENGTH = 5  # variables per assignment chain
DOC_BYTES = 400  # rough size of one document; longer prompts get more documents
MIN_LENGTH = {"single_needle": 384, "multi_key": 512, "multi_value": 512, "multi_query": 512,
              "variable_tracking": 512, "multi_doc_qa": 512, "multi_doc_qa_2hop": 512}


def _number_words(n: int) -> str:
    """1..999 in words, without hyphens (the haystack has none, so keys stay unique)."""
    if n >= 100:
        hundreds = f"{ONES[n // 100]} hundred"
        return hundreds if n % 100 == 0 else f"{hundreds} and {_number_words(n % 100)}"
    if n < 20:
        return ONES[n]
    return TENS[n // 10] + ("" if n % 10 == 0 else f" {ONES[n % 10]}")


def _capitalize(text: str) -> str:
    return text[0].upper() + text[1:]


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "sh")) else "s")


PYDOC_ASCII = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "*": None, "-": " "})
PROSE = re.compile(r"[A-Z][ -~]{28,298}[a-z)\"]\.")  # printable ASCII, 30-300 bytes, ends after a word
# Digits and VAR would fake facts; then markup, and "e.g." cut off from what it introduced.
NOT_PROSE = re.compile(r"\d|VAR|>>>|[\[\]`|\\{}#~^]|\b(e\.g|i\.e)\.$")


@functools.cache
def pydoc_sentences() -> tuple[str, ...]:
    """The prose sentences of ``pydoc_data.topics``, cleaned as the module docstring says, each once."""
    from pydoc_data.topics import topics

    sentences = {}
    for topic in sorted(topics):  # a dict's order is no promise; sorted is
        for paragraph in topics[topic].split("\n\n"):
            for sentence in re.split(r"(?<=\.) (?=[A-Z])", " ".join(paragraph.translate(PYDOC_ASCII).split())):
                if (PROSE.fullmatch(sentence) and not NOT_PROSE.search(sentence) and sentence.count('"') % 2 == 0
                        and sentence.count("(") == sentence.count(")")):
                    sentences[sentence] = None
    return tuple(sentences)


@functools.cache
def corpus_digest() -> str:
    return hashlib.sha256("\n".join(pydoc_sentences()).encode()).hexdigest()[:16]


@functools.cache
def _pydoc_words() -> frozenset:
    """Every word of the pydoc sentences as invented words and variables would spell it."""
    words = set(re.findall(r"[A-Za-z]+", " ".join(pydoc_sentences())))
    return frozenset(w.lower() for w in words) | frozenset(w.upper() for w in words)


class Source:
    """Per-sample randomness and invented vocabulary; nothing invented repeats within a sample.
    With the pydoc haystack, also the corpus and the position of the next sentence to read."""

    def __init__(self, task: str, length: int, seed: int, haystack: str = DEFAULT_HAYSTACK):
        pydoc = haystack == "pydoc"
        self.length = length  # as requested, whatever the prompt's size: it sets the number of documents
        # Only random() is guaranteed stable across Python versions, so all draws derive from it.
        key = f"sagekv.tasks:{task}:{length}:{seed}" + (f":pydoc:{corpus_digest()}" if pydoc else "")
        self._random = random.Random(key).random
        self._taken = set(ENGLISH_WORDS) | (_pydoc_words() if pydoc else set())
        self.nouns = [self.word() for _ in range(60)]
        self.places = [self.word().capitalize() for _ in range(20)]
        self.names = [self.word().capitalize() for _ in range(20)]
        self.corpus = pydoc_sentences() if pydoc else ()
        self._next = self.below(len(self.corpus)) if pydoc else 0

    def read(self) -> str:
        """The corpus's next sentence, from the first again after the last."""
        sentence = self.corpus[self._next % len(self.corpus)]
        self._next += 1
        return sentence

    def below(self, n: int) -> int:
        return int(self._random() * n)

    def chance(self, p: float) -> bool:
        return self._random() < p

    def choice(self, items):
        return items[self.below(len(items))]

    def shuffled(self, items) -> list:
        items = list(items)
        for i in range(len(items) - 1, 0, -1):
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]
        return items

    def _unique(self, make):
        while (item := make()) in self._taken:
            pass
        self._taken.add(item)
        return item

    def word(self) -> str:
        syllable = lambda: self.choice(ONSETS) + self.choice(VOWELS) + self.choice(CODAS)
        return self._unique(lambda: "".join(syllable() for _ in range(2 + self.below(2))))

    def key(self) -> str:
        return f"{self.word()}-{self.word()}"

    def value(self) -> str:
        return self._unique(lambda: str(1_000_000 + self.below(9_000_000)))

    def variable(self) -> str:
        return self._unique(lambda: "".join(chr(65 + self.below(26)) for _ in range(5)))

    def person(self) -> str:
        return f"{self.word().capitalize()} {self.word().capitalize()}"

    def organization(self) -> str:
        return f"the {self.word().capitalize()} {self.choice(ORG_KINDS)}"


def _sentence(src: Source, subject: str = "") -> str:
    if src.corpus:
        return src.read()
    fillers = {
        "adj": lambda: src.choice(ADJECTIVES), "verb": lambda: src.choice(VERBS),
        "intrans": lambda: src.choice(INTRANSITIVE), "adv": lambda: src.choice(ADVERBS),
        "prep": lambda: src.choice(PREPOSITIONS), "time": lambda: src.choice(TIMES),
        "conn": lambda: src.choice(CONNECTORS), "noun": lambda: src.choice(src.nouns),
        "nouns": lambda: _plural(src.choice(src.nouns)),
        "place": lambda: src.choice(src.places), "name": lambda: src.choice(src.names),
        "num": lambda: _number_words(2 + src.below(998)), "subject": lambda: subject,
    }
    templates = SUBJECT_TEMPLATES if subject and src.chance(0.5) else HAYSTACK_TEMPLATES
    return _capitalize(re.sub(r"\{(\w+)\}", lambda m: fillers[m.group(1)](), src.choice(templates)))


def _fragment(sentence: str, budget: int) -> str:
    """The longest word prefix of `sentence` that, closed with a period, fits in `budget` bytes."""
    words = sentence.rstrip(".").split(" ")
    count = 0
    while count < len(words) and len(" ".join(words[:count + 1])) + 1 <= budget:
        count += 1
    while count and words[count - 1].lower().strip(",") in DANGLING:
        count -= 1
    return " ".join(words[:count]).rstrip(",") + "." if count else ""


def _filler(src: Source, budget: int, subject: str = "", cut: bool = True) -> list[str]:
    """Sentences whose lengths plus one separator byte each add up to at most `budget`.

    With `cut`, the remaining gap is closed with the best-fitting cut sentence, so that the
    prompt lands within a few bytes of its target length.
    """
    sentences, tail, misses = [], "", 0
    while True:
        sentence = _sentence(src, subject)
        if len(sentence) + 1 <= budget:
            sentences.append(sentence)
            budget -= len(sentence) + 1
            tail = ""
            continue
        misses += 1
        if cut:
            tail = max(tail, _fragment(sentence, budget - 1), key=len)
        if misses % 16 == 0:  # no whole sentence fits any more: keep the best cut one, if any
            if not tail:
                return sentences
            sentences.append(tail)
            budget -= len(tail) + 1
            tail = ""


def _weave(src: Source, budget: int, inserts: list[str]) -> str:
    """About `budget` bytes of haystack with `inserts`, in order, at uniformly random sentence boundaries."""
    units = _filler(src, budget - sum(len(insert) + 1 for insert in inserts))
    slots = sorted(src.below(len(units) + 1) for _ in inserts)
    for offset, (slot, insert) in enumerate(zip(slots, inserts)):
        units.insert(slot + offset, insert)
    separators = ["\n" if src.chance(0.2) else " " for _ in units[1:]] + ["\n"]  # "\n" ends a paragraph
    return "".join(unit + separator for unit, separator in zip(units, separators))


# What a task builds from a Source and a target length: (prompt, answer, answers, documents, question).
Parts = tuple[str, str, tuple[str, ...], tuple[str, ...], str]


def _needle_task(src: Source, length: int, header: str, inserts: list[str], question: str,
                 answers: tuple[str, ...], answer: str = "") -> Parts:
    """`answer` defaults to the answers joined by ", "."""
    context = _weave(src, length - len(header) - len(question), inserts)
    return header + context + question, answer or ", ".join(answers), answers, (), question


def _magic_question(key: str) -> str:
    return f"\nQuestion: What is the magic number for {key}?\nAnswer: The magic number for {key} is "


def single_needle(src: Source, length: int) -> Parts:
    key, value = src.key(), src.value()
    header = "A magic number is hidden in the text below. Remember it.\n\n"
    return _needle_task(src, length, header, [f"The magic number for {key} is {value}."],
                        _magic_question(key), (value,))


MANY_HEADER = "Several magic numbers are hidden in the text below. Remember them.\n\n"


def multi_key(src: Source, length: int) -> Parts:
    needles = {src.key(): src.value() for _ in range(NEEDLES)}
    asked = src.choice(list(needles))
    inserts = [f"The magic number for {key} is {value}." for key, value in src.shuffled(needles.items())]
    return _needle_task(src, length, MANY_HEADER, inserts, _magic_question(asked), (needles[asked],))


def multi_value(src: Source, length: int) -> Parts:
    key, values = src.key(), [src.value() for _ in range(NEEDLES)]
    question = (f"\nQuestion: What are all the magic numbers for {key}?"
                f"\nAnswer: The magic numbers for {key} are ")
    inserts = [f"The magic number for {key} is {value}." for value in values]
    return _needle_task(src, length, MANY_HEADER, inserts, question, tuple(values))


def multi_query(src: Source, length: int) -> Parts:
    needles = {src.key(): src.value() for _ in range(NEEDLES)}
    asked = src.shuffled(needles)[:2]
    keys = " and ".join(asked)
    question = (f"\nQuestion: What are the magic numbers for {keys}?"
                f"\nAnswer: The magic numbers for {keys} are ")
    inserts = [f"The magic number for {key} is {value}." for key, value in src.shuffled(needles.items())]
    return _needle_task(src, length, MANY_HEADER, inserts, question, tuple(needles[key] for key in asked))


def variable_tracking(src: Source, length: int) -> Parts:
    chains = [[src.variable() for _ in range(CHAIN_LENGTH)] for _ in range(2)]
    values = [src.value() for _ in chains]
    pending = [[f"VAR {chain[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
               for chain, value in zip(chains, values)]
    inserts = []  # the chains interleaved at random, each kept in assignment order
    while any(pending):
        inserts.append(src.choice([p for p in pending if p]).pop(0))
    header = "Chains of variable assignments are hidden in the text below. Track them.\n\n"
    *sources, asked = chains[0]
    question = (f"\nQuestion: What is the value of VAR {asked}? Follow its chain of assignments back to the number."
                f"\nAnswer: VAR {asked} = VAR ")
    hops = (*reversed(sources), values[0])  # each the right-hand side of the statement of the one before
    return _needle_task(src, length, header, inserts, question, hops, " = VAR ".join(hops[:-1]) + f" = {hops[-1]}")


def _documents(src: Source, length: int, question: str, facts: list[tuple[str, str]]) -> tuple[str, ...]:
    """One document per (subject, fact), sized so that the documents plus `question` fill `length`."""
    remaining, documents = length - len(question), []
    for number, (subject, fact) in enumerate(facts, 1):
        head = f"Document {number}:\nAbout {subject}\n"
        target = remaining // (len(facts) - number + 1)  # earlier shortfalls carry over to later documents
        body = _filler(src, target - len(head) - len(fact) - 2, subject, cut=number == len(facts))
        body.insert(src.below(len(body) + 1), fact)
        documents.append(head + " ".join(body) + "\n\n")
        remaining -= len(documents[-1])
    return tuple(documents)


def _doc_question(question: str, prefix: str) -> str:
    return f"Question: {question}\nAnswer: {prefix}"


def multi_doc_qa(src: Source, length: int) -> Parts:
    facts, questions = [], []
    for _ in range(max(3, src.length // DOC_BYTES)):
        entity = src.organization()
        fact, question, kind = src.choice(ORG_FACTS)
        value = src.person() if kind == "person" else src.word().capitalize()
        fields = {"e": entity, "E": _capitalize(entity), "v": value}
        facts.append((entity, fact.format(**fields)))
        prefix = fact.split("{v}")[0].format(**fields)
        questions.append((_doc_question(question.format(**fields), prefix), value))
    question, value = src.choice(questions)
    documents = _documents(src, length, question, facts)
    return "".join(documents) + question, value, (value,), documents, question


def multi_doc_qa_2hop(src: Source, length: int) -> Parts:
    count = max(3, src.length // DOC_BYTES)
    chains = [(src.person(), src.organization(), src.word().capitalize()) for _ in range((count + 1) // 2)]
    pairs = [[(person, f"{person} works for {organization}."),
              (organization, f"{_capitalize(organization)} is based in the city of {city}.")]
             for person, organization, city in chains]
    distractors = src.shuffled(fact for pair in pairs[1:] for fact in pair)[:count - 2]
    facts = src.shuffled(pairs[0] + distractors)
    person, organization, _ = chains[0]
    (_, employment), (_, location) = pairs[0]
    prefix = employment.removesuffix(f"{organization}.")
    question = _doc_question(f"In which city is the organization that {person} works for based?", prefix)
    answer = f"{employment} {location}".removeprefix(prefix).removesuffix(".")  # both facts, bridge first
    documents = _documents(src, length, question, facts)
    return "".join(documents) + question, answer, (answer,), documents, question


# Task name -> the function that builds its Parts; call generate() rather than these directly.
TASKS = {task.__name__: task for task in (single_needle, multi_key, multi_value, multi_query,
                                          variable_tracking, multi_doc_qa, multi_doc_qa_2hop)}
DOCUMENT_TASKS = ("multi_doc_qa", "multi_doc_qa_2hop")  # tasks whose samples have documents and a question


def documents_of(sample: Sample, size: int = DOC_BYTES) -> tuple:
    """The sample's documents; for a task without them, its context (the prompt before the question)
    cut after sentence ends into documents of about ``size`` bytes, so that every task can be answered
    over independently prefilled documents (a needle then lies in one of them).
    ``"".join(documents_of(sample)) + sample.question == sample.prompt``."""
    if sample.documents:
        return sample.documents
    context = sample.prompt[: len(sample.prompt) - len(sample.question)]
    documents, start = [], 0
    for match in re.finditer(r"(?<=\.) |\n", context):
        if match.end() - start >= size:
            documents.append(context[start : match.end()])
            start = match.end()
    tail = context[start:]
    if documents and len(tail) < size // 4:  # too short to stand alone
        documents[-1] += tail
    elif tail:
        documents.append(tail)
    return tuple(documents)


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def generate(task: str, length: int, seed: int, haystack: str = DEFAULT_HAYSTACK) -> Sample:
    _check(task, length, seed, haystack)
    return _sized(task, length, seed, haystack, length)


def _check(task: str, length: int, seed: int, haystack: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if haystack not in HAYSTACKS:
        raise ValueError(f"unknown haystack {haystack!r}; valid haystacks: {', '.join(HAYSTACKS)}")
    if isinstance(length, bool) or not isinstance(length, int):
        raise ValueError(f"length must be an int, got {length!r}")
    if length < MIN_LENGTH[task]:
        raise ValueError(f"length {length} is too small for task {task!r} (minimum {MIN_LENGTH[task]})")
    _check_seed(seed)


def _sized(task: str, length: int, seed: int, haystack: str, size: int) -> Sample:
    """The sample of (task, length, seed, haystack) made to a prompt of about ``size`` bytes."""
    return Sample(task, length, seed, *TASKS[task](Source(task, length, seed, haystack), size), haystack)


FIT_TRIES = 16


def generate_in_tokens(task: str, length: int, seed: int, encode, haystack: str = DEFAULT_HAYSTACK) -> Sample:
    """A sample whose prompt is within 3% of ``length`` tokens of ``encode`` (text -> token ids).

    The first try is ``generate``'s sample, ``length`` bytes, kept when it fits: for the byte-level
    reference model it does (``generate`` lands within a few bytes), so its samples stay. Otherwise the same sample (the same random draws: needles,
    questions and the filler's sentences in order; the number of documents) is made again to a
    prompt size in bytes rescaled by the tokens counted, until it fits; bisected between the largest
    size found too short and the smallest found too long where rescaling steps outside them (the
    count can jump where a dense sentence comes in). The sample's ``length`` is ``length``, now in
    tokens, and its prompt ends as :func:`ending_for` says.
    """
    _check(task, length, seed, haystack)
    size, short, long = length, MIN_LENGTH[task], None
    for _ in range(FIT_TRIES):
        sample = _sized(task, length, seed, haystack, size)
        tokens = len(encode(sample.prompt))
        if abs(tokens - length) <= TOLERANCE * length:
            return ending_for(sample, encode)
        if tokens < length:
            short = max(short, size)
        else:
            long = size if long is None else min(long, size)
        size = round(size * length / tokens)
        if long is not None and not short < size < long:  # overshot a jump in the count
            size = (short + long) // 2
    raise SageKVError(f"cannot fit a {task} prompt (seed {seed}) to within {TOLERANCE:.0%} of {length} tokens "
                      f"(the last try had {tokens} tokens)")


def ending_for(sample: Sample, encode) -> Sample:
    """The sample with its prompt ending where ``encode``'s tokenizer expects the answer to start.

    Prompts end with the answer's prefix up to a space ("... is "), which the byte-level model
    reads as one more byte. A tokenizer whose words carry their leading space (BPE: " Kordan" is one
    token) would instead end the prompt on a lone space token, which such a model rarely sees before
    a word: SmolLM2-135M then writes digits for every name (multi_doc_qa: 0 of 3 seeds right, 2 of 3
    without the space). For such a tokenizer the prompt stops before that space and the model writes
    it; scoring ignores leading whitespace.
    """
    if not sample.question.endswith(" ") or len(encode(" x")) != len(encode("x")):
        return sample
    question = sample.question.rstrip(" ")
    prompt = sample.prompt[: len(sample.prompt) - len(sample.question)] + question
    return dataclasses.replace(sample, prompt=prompt, question=question)


def split_of(seed: int) -> str:
    _check_seed(seed)
    if seed in EVAL_SEEDS:
        return "eval"
    if seed in TRAIN_SEEDS:
        return "train"
    raise ValueError(f"seed {seed} is outside EVAL_SEEDS and TRAIN_SEEDS (seeds must be < 2**31)")


def _whole(item: str) -> str:
    return rf"(?<![A-Za-z0-9]){re.escape(item)}(?![A-Za-z0-9])"


def score(sample: Sample, text: str) -> float:
    if len(sample.answers) == 1:
        return 1.0 if re.match(_whole(sample.answer), text.lstrip()) else 0.0
    return sum(bool(re.search(_whole(item), text)) for item in sample.answers) / len(sample.answers)
