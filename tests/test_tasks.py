import hashlib
import re

import pytest

from conftest import byte_tokens, word_tokens
from sagekv.errors import SageKVError
from sagekv.tasks import (DOC_BYTES, DOCUMENT_TASKS, EVAL_SEEDS, HAYSTACKS, MIN_LENGTH, TASKS, TRAIN_SEEDS, documents_of, generate,
                          ending_for, generate_in_tokens, pydoc_sentences, score, split_of)

LENGTHS = [512, 1024, 2048, 4096, 8192]
SEEDS = [0, 17, 1_000_003]
NEEDLE_TASKS = ["single_needle", "multi_key", "multi_value", "multi_query"]
DOC_TASKS = list(DOCUMENT_TASKS)  # test_prompt_ends_with_question_and_answer_prefix checks it
NEEDLE = re.compile(r"The magic number for ([a-z]+-[a-z]+) is (\d{7})\.")
STATEMENT = re.compile(r"VAR ([A-Z]{5}) = (?:(\d{7})|VAR ([A-Z]{5}))\.")

# Any change to these changes every stored sample: only update them on purpose.
PROMPT_DIGESTS = {
    "single_needle": "0f3eb99bd0dad0c3",
    "multi_key": "3dd15508c14eb2f0",
    "multi_value": "455b89a06e43426b",
    "multi_query": "5e93bf6bb3bc06b0",
    "variable_tracking": "b8c27ecf724b3190",
    "multi_doc_qa": "07e11ef30150332c",
    "multi_doc_qa_2hop": "fab5dd6ef5a9f17a",
}


@pytest.fixture(params=HAYSTACKS)
def haystack(request):
    """Tests that take it hold for either haystack."""
    return request.param


def context_without_facts(sample):
    """The prompt before the question, with needles and assignment statements removed."""
    context = sample.prompt[: len(sample.prompt) - len(sample.question)]
    return STATEMENT.sub("", NEEDLE.sub("", context))


def test_all_tasks_are_registered():
    assert list(TASKS) == NEEDLE_TASKS + ["variable_tracking"] + DOC_TASKS


@pytest.mark.parametrize("task", TASKS)
def test_generation_is_deterministic(task, haystack):
    assert generate(task, 1024, 5, haystack) == generate(task, 1024, 5, haystack)
    assert generate(task, 1024, 5, haystack).prompt != generate(task, 1024, 6, haystack).prompt
    assert generate(task, 1024, 5, haystack).haystack == haystack
    if haystack == "syllable":  # pydoc samples depend on the running CPython's documentation
        digest = hashlib.sha256(generate(task, 1024, 0).prompt.encode()).hexdigest()[:16]
        assert digest == PROMPT_DIGESTS[task]


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", TASKS)
def test_prompt_length_is_within_three_percent(task, length, haystack):
    for seed in SEEDS:
        sample = generate(task, length, seed, haystack)
        assert sample.prompt.isascii()
        assert abs(len(sample.prompt.encode()) - length) <= 0.03 * length


@pytest.mark.parametrize("task", TASKS)
def test_minimum_length_is_accepted_and_within_three_percent(task, haystack):
    length = MIN_LENGTH[task]
    for seed in range(20):
        assert abs(len(generate(task, length, seed, haystack).prompt) - length) <= 0.03 * length


@pytest.mark.parametrize("task", TASKS)
def test_prompt_ends_with_question_and_answer_prefix(task, haystack):
    sample = generate(task, 2048, 3, haystack)
    assert sample.prompt.endswith(sample.question)
    assert sample.question.startswith(("\nQuestion: ", "Question: "))
    assert "\nAnswer: " in sample.question and sample.question.endswith(" ")
    if task in ("variable_tracking", "multi_doc_qa_2hop"):  # hops written out in the facts' own words
        assert all(item in sample.answer for item in sample.answers)
    else:
        assert sample.answer == ", ".join(sample.answers)
    assert (len(sample.documents) > 0) == (task in DOC_TASKS)


@pytest.mark.parametrize("task", NEEDLE_TASKS)
def test_needles_hold_the_answers(task, haystack):
    for seed in SEEDS:
        sample = generate(task, 4096, seed, haystack)
        needles = NEEDLE.findall(sample.prompt)
        assert len(needles) == (1 if task == "single_needle" else 4)
        values = [value for _, value in needles]
        assert len(set(values)) == len(values)
        asked = re.findall(r"[a-z]+-[a-z]+", sample.question.split("\n")[1])
        if task == "multi_value":
            assert {key for key, _ in needles} == set(asked)
            assert sample.answers == tuple(values)  # in order of appearance
        else:
            assert sample.answers == tuple(dict(needles)[key] for key in asked)
        prefix = sample.question.rsplit("Answer: ", 1)[1]
        assert prefix.startswith("The magic number") and all(key in prefix for key in asked)


def test_single_needle_answer_prefix_repeats_the_needle():
    sample = generate("single_needle", 1024, 9)
    (key, value), = NEEDLE.findall(sample.prompt)
    assert f"The magic number for {key} is {value}." in sample.prompt
    assert sample.question.endswith(f"Answer: The magic number for {key} is ")


def test_variable_tracking_chain_is_consistent(haystack):
    for seed in SEEDS:
        sample = generate("variable_tracking", 2048, seed, haystack)
        sources = {}
        for variable, number, source in STATEMENT.findall(sample.prompt):
            assert variable not in sources
            assert number or source in sources  # every variable is assigned before it is used
            sources[variable] = number or source
        asked = re.search(r"Answer: VAR ([A-Z]{5}) = VAR $", sample.question).group(1)
        hops = [sources[asked]]
        while hops[-1] in sources:
            hops.append(sources[hops[-1]])
        assert sample.answers == tuple(hops) and len(hops) == 5 and hops[-1].isdigit()
        assert sample.answer == " = VAR ".join(hops[:-1]) + " = " + hops[-1]
        assert asked not in sources.values()  # the asked variable ends its chain
        assert sum(source.isdigit() for source in sources.values()) == 2  # one distractor chain


@pytest.mark.parametrize("task", NEEDLE_TASKS + ["variable_tracking"])
def test_haystack_has_no_digits_and_keys_do_not_leak(task, haystack):
    for seed in SEEDS:
        sample = generate(task, 8192, seed, haystack)
        filler = context_without_facts(sample)
        assert not re.search(r"\d", filler)
        assert "-" not in filler and "VAR" not in filler
        for key, _ in NEEDLE.findall(sample.prompt):
            needles = len(re.findall(rf"The magic number for {key} is \d{{7}}\.", sample.prompt))
            assert sample.prompt.count(key) == needles + sample.question.count(key)


@pytest.mark.parametrize("task", NEEDLE_TASKS + ["variable_tracking"])
def test_needle_depths_are_spread_over_the_context(task, haystack):
    depths = []
    for seed in range(30):
        sample = generate(task, 2048, seed, haystack)
        context = len(sample.prompt) - len(sample.question)
        facts = [*NEEDLE.finditer(sample.prompt), *STATEMENT.finditer(sample.prompt)]
        depths += [fact.start() / context for fact in facts]
    assert min(depths) < 0.15 and max(depths) > 0.85
    assert 0.35 < sum(depths) / len(depths) < 0.65


@pytest.mark.parametrize("task", DOC_TASKS)
def test_documents_make_up_the_prompt(task, haystack):
    for length in (512, 8192):
        sample = generate(task, length, 11, haystack)
        assert sample.prompt == "".join(sample.documents) + sample.question
        assert len(sample.documents) >= 3
        for number, document in enumerate(sample.documents, 1):
            assert document.startswith(f"Document {number}:\n") and document.endswith("\n\n")
        # Only the document headers carry digits.
        assert not re.search(r"\d", re.sub(r"Document \d+:", "", sample.prompt))
    assert len(generate(task, 8192, 11, haystack).documents) > len(generate(task, 1024, 11, haystack).documents)


@pytest.mark.parametrize("task", sorted(set(TASKS) - set(DOCUMENT_TASKS)))
@pytest.mark.parametrize("length", [512, 4096])
def test_a_haystack_cut_into_documents(task, length, haystack):
    """Without documents of its own, a sample's context is cut after sentence ends into documents of
    about DOC_BYTES; with them, they are the documents."""
    sample = generate(task, length, 5, haystack)
    documents = documents_of(sample)
    assert "".join(documents) + sample.question == sample.prompt
    assert all(d.endswith((". ", "\n")) for d in documents[:-1])
    assert all(len(d) >= DOC_BYTES for d in documents[:-1]) and all(len(d) < 2 * DOC_BYTES + 200 for d in documents)
    assert len(documents) >= length // (2 * DOC_BYTES)
    if task == "single_needle":  # the needle lies whole in one document
        needle = NEEDLE.search(sample.prompt).group(0)
        assert [needle in d for d in documents].count(True) == 1
    with_documents = generate("multi_doc_qa", length, 5, haystack)
    assert documents_of(with_documents) == with_documents.documents


def test_multi_doc_qa_answer_is_in_exactly_one_document(haystack):
    for seed in SEEDS:
        sample = generate("multi_doc_qa", 4096, seed, haystack)
        fact = sample.question.rsplit("Answer: ", 1)[1] + sample.answer + "."
        assert [fact in document for document in sample.documents].count(True) == 1
        assert sample.prompt.count(sample.answer) == 1


def test_multi_doc_qa_2hop_needs_two_documents(haystack):
    for seed in SEEDS:
        sample = generate("multi_doc_qa_2hop", 4096, seed, haystack)
        person = re.search(r"organization that (.+) works for based\?", sample.question).group(1)
        assert sample.question.endswith(f"Answer: {person} works for ")
        employment = re.compile(rf"{person} works for (the [A-Za-z]+ [a-z]+)\.")
        [(works, organization)] = [(i, match.group(1)) for i, document in enumerate(sample.documents)
                                   if (match := employment.search(document))]
        city = re.fullmatch(rf"{organization}\. (.+) is based in the city of ([A-Za-z]+)", sample.answer)
        assert city.group(1) == organization[0].upper() + organization[1:]
        based = f"{city.group(1)} is based in the city of {city.group(2)}."
        [located] = [i for i, document in enumerate(sample.documents) if based in document]
        assert works != located
        assert sample.prompt.count(city.group(2)) == 1 and sample.answers == (sample.answer,)


@pytest.mark.parametrize("task", TASKS)
def test_score_rewards_the_answer_only(task):
    sample = generate(task, 1024, 2)
    assert score(sample, sample.answer) == 1.0
    assert score(sample, "  " + sample.answer + ".\nQuestion: more text") == 1.0
    assert score(sample, "nothing useful") == 0.0
    assert score(sample, "") == 0.0
    if len(sample.answers) == 1:
        assert score(sample, sample.answer + "7") == 0.0  # a longer token is a different answer
        assert score(sample, "I think " + sample.answer) == 0.0  # must come first
    else:
        half = len(sample.answers) // 2
        assert score(sample, ", ".join(sample.answers[:half])) == pytest.approx(half / len(sample.answers))
        assert score(sample, ", ".join(item + "0" for item in sample.answers)) == 0.0


def test_haystack_is_varied(haystack):
    sample = generate("single_needle", 8192, 4, haystack)
    sentences = [s.strip() for s in re.split(r"(?<=\.)\s", context_without_facts(sample)) if s.strip()]
    assert len(sentences) > 60
    assert len(set(sentences)) > 0.9 * len(sentences)
    words = re.findall(r"[a-z]+", sample.prompt.lower())
    assert len(set(words)) > 150


def test_pydoc_corpus_is_clean_prose_enough_for_long_prompts():
    sentences = pydoc_sentences()
    assert len(set(sentences)) == len(sentences)
    assert sum(len(s) + 1 for s in sentences) > 150_000  # 8192 tokens of a BPE tokenizer take about 40 KB
    for s in sentences:
        assert s.isascii() and s[0].isupper() and s.endswith(".") and 30 <= len(s) <= 300, s
        assert not re.search(r"\d|-|VAR|>>>|[*`]", s), s


def test_pydoc_samples_read_on_through_the_corpus_without_repeats():
    sentences = pydoc_sentences()
    position = {s: i for i, s in enumerate(sentences)}
    for seed in range(3):
        sample = generate("multi_key", 40_000, seed, "pydoc")  # about 8192 tokens of a BPE tokenizer
        read = [s for s in re.split(r"(?<=\.)\s+(?=[A-Z])", context_without_facts(sample)) if s in position]
        assert len(read) > 250 and len(set(read)) == len(read)
        steps = [(position[b] - position[a]) % len(sentences) for a, b in zip(read, read[1:])]
        assert steps.count(1) > 0.9 * len(steps)  # but at the end, where sentences too long are passed over
    starts = {generate("single_needle", 1024, seed, "pydoc").prompt.split("\n\n")[1][:80] for seed in range(10)}
    assert len(starts) == 10


def test_byte_tokens_are_the_reference_tokenizer():
    pytest.importorskip("transformers")
    from sagekv.checkpoints import byte_tokenizer

    prompt = generate("multi_key", 1024, 0, "pydoc").prompt
    assert byte_tokenizer().encode(prompt) == byte_tokens(prompt)


@pytest.mark.parametrize("task", TASKS)
def test_fitting_to_byte_tokens_keeps_every_sample(task, haystack):
    """The samples of stored results on the reference model stay the same."""
    for length in sorted({MIN_LENGTH[task], 512, 1024, 2048, 4096, 8192}):
        for seed in range(20):
            assert generate_in_tokens(task, length, seed, byte_tokens, haystack) == generate(task, length, seed, haystack)


@pytest.mark.parametrize("task", TASKS)
def test_prompts_fitted_to_another_tokenizer(task, haystack):
    for length in (MIN_LENGTH[task], 2048, 8192):
        for seed in SEEDS:
            sample = generate_in_tokens(task, length, seed, word_tokens, haystack)
            assert abs(len(word_tokens(sample.prompt)) - length) <= 0.03 * length
            assert len(sample.prompt) > 3 * length and sample.length == length
            as_bytes = generate(task, length, seed, haystack)  # the same draws, made longer
            # the words carry their spaces, so the prompt stops before the answer prefix's last space
            assert (sample.answer, sample.question + " ", len(sample.documents)) == (as_bytes.answer, as_bytes.question,
                                                                                      len(as_bytes.documents))
            assert "".join(documents_of(sample)) + sample.question == sample.prompt
    assert generate_in_tokens(task, 2048, 5, word_tokens, haystack) == generate_in_tokens(task, 2048, 5, word_tokens, haystack)


@pytest.mark.parametrize("task", TASKS)
def test_the_prompt_ends_where_the_tokenizer_starts_the_answer(task):
    sample = generate(task, 1024, 3)
    assert sample.question.endswith(" ") and ending_for(sample, byte_tokens) == sample  # bytes: the space is read
    words = ending_for(sample, word_tokens)  # words carry their spaces: the model writes it
    assert words.prompt == sample.prompt[:-1] and words.question == sample.question[:-1]
    assert score(words, " " + sample.answer) == 1.0 and ending_for(words, word_tokens) == words


def test_a_prompt_that_cannot_fit_is_refused():
    with pytest.raises(SageKVError, match=r"^cannot fit a single_needle prompt \(seed 2\) to within 3% of 1024 tokens \("):
        generate_in_tokens("single_needle", 1024, 2, lambda text: [0] * 5000)
    with pytest.raises(ValueError, match="unknown haystack"):
        generate_in_tokens("single_needle", 1024, 2, word_tokens, "prose")


@pytest.mark.parametrize(
    "args, message",
    [
        (("needle", 1024, 0), "valid tasks: single_needle, multi_key"),
        (("single_needle", 100, 0), "minimum 384"),
        (("multi_doc_qa", 300, 0), "minimum 512"),
        (("single_needle", 1024.0, 0), "length must be an int"),
        (("single_needle", "1024", 0), "length must be an int"),
        (("single_needle", 1024, -1), "seed must be a non-negative int"),
        (("single_needle", 1024, 1.5), "seed must be a non-negative int"),
        (("single_needle", 1024, True), "seed must be a non-negative int"),
        (("single_needle", 1024, 0, "prose"), "unknown haystack 'prose'; valid haystacks: syllable, pydoc"),
    ],
)
def test_bad_input_raises_value_error(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        generate(*args)


def test_seed_ranges_do_not_overlap():
    assert EVAL_SEEDS.stop <= TRAIN_SEEDS.start and EVAL_SEEDS.step == TRAIN_SEEDS.step == 1
    assert split_of(0) == split_of(EVAL_SEEDS[-1]) == "eval"
    assert split_of(TRAIN_SEEDS[0]) == split_of(2**31 - 1) == "train"
    for bad in (-1, 2**31, 0.5):
        with pytest.raises(ValueError):
            split_of(bad)
