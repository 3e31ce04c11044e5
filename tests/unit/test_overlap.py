"""Overlap-aware grouping and the leakage report, on hand-made rows whose overlaps are known."""

from __future__ import annotations

import pytest

from raytune_ft.config.schema import NormalizeConfig, OverlapConfig, SplitConfig
from raytune_ft.data.curation import normalizer
from raytune_ft.data.overlap import group_rows, jaccard, leakage, resolve, shingles, words
from raytune_ft.data.readers import Records
from raytune_ft.data.split import SPLITS, split_records

KEY = normalizer(NormalizeConfig())
SETTINGS = resolve(OverlapConfig(), causal_lm=False)


def group_of(texts: list[str], **overrides) -> dict[str, int]:
    """text -> the index of its group (-1: a common phrase, kept in train)."""
    grouping = group_rows(texts, KEY, resolve(OverlapConfig(**overrides), causal_lm=False))
    found = {texts[i]: g for g, rows in enumerate(grouping.groups) for i in rows}
    found.update({texts[i]: -1 for i in grouping.common})
    assert sorted(found) == sorted(set(texts))
    return found


def test_a_sentence_and_its_phrases_form_one_group_whichever_comes_first():
    texts = [
        "a gorgeous , witty , seductive movie .",  # the sentence first, its phrases after
        "witty , seductive movie",
        "seductive",
        "The plot is a mess from start to finish",
        "the plot is",  # a phrase that comes before ...
        "A mess from start",  # ... and one whose case and punctuation differ
    ]
    groups = group_of(texts)
    assert groups[texts[0]] == groups[texts[1]] == groups[texts[2]]
    assert groups[texts[3]] == groups[texts[4]] == groups[texts[5]]
    assert groups[texts[0]] != groups[texts[3]]
    # the rows no other row contains: the two sentences
    assert group_rows(texts, KEY, SETTINGS).whole == [True, False, False, True, False, False]
    # word sequences, not characters: "film" is not inside "filmmaker"
    assert len(set(group_of(["the filmmaker is bold", "film"]).values())) == 2


def test_a_chain_of_phrases_is_one_group():
    sentence = "one of the most original american productions this year"
    chain = [sentence, "the most original american productions this", "original american productions", "american"]
    assert len(set(group_of(chain[::-1]).values())) == 1


def test_near_duplicates_group_and_dissimilar_texts_do_not():
    texts = [
        "the acting is superb and the story moves along at a brisk pace",
        "the acting is superb and the story moves along at a brisk pace !!!",  # the same after normalisation
        "the acting is superb and the story moves along at a very brisk pace",  # one word more
        "the acting is wooden and the story drags from the first scene to the last",
    ]
    similar = jaccard(shingles(words(KEY(texts[0])), 3), shingles(words(KEY(texts[2])), 3))
    assert similar == pytest.approx(9 / 14)  # 9 of the 11 + 12 three-word shingles in common
    groups = group_of(texts, similarity=0.6)
    assert groups[texts[0]] == groups[texts[1]] == groups[texts[2]] != groups[texts[3]]
    # above the threshold only: at 0.7 the one-word variant is a text of its own
    strict = group_of(texts, similarity=0.7)
    assert strict[texts[0]] == strict[texts[1]] != strict[texts[2]]
    # and with near-duplicates off, only the normalised copies share a group
    off = group_of(texts, similarity=0.6, near_duplicates=False, containment=False)
    assert off[texts[0]] == off[texts[1]] and len(set(off.values())) == 3


def test_common_phrases_do_not_chain_sentences_and_stay_in_train():
    sentences = [f"the film is {adjective} and sincere" for adjective in ("warm", "cold", "long", "short", "odd")]
    sentences += [f"in the end the film is {adjective}" for adjective in ("dull", "fun", "wise", "safe", "lame")]
    # "the film is" sits inside all ten (over max_containers 8); "the film" is short and inside all ten too;
    # "is warm and sincere" is inside one sentence only
    texts = [*sentences, "the film is", "the film", "is warm and sincere"]
    groups = group_of(texts)
    assert len({groups[s] for s in sentences}) == 10  # not chained into one group
    assert groups["the film is"] == groups["the film"] == -1
    assert groups["is warm and sincere"] == groups[sentences[0]]
    # a long phrase shared by a few sentences links them: each pair has a 3-word phrase in common
    linked = group_of(["a b c x y z one", "a b c x y z two", "x y z"], max_containers=2)
    assert len(set(linked.values())) == 1
    # ... but not when it is in more sentences than max_containers
    assert linked != group_of(["a b c x y z one", "a b c x y z two", "x y z"], max_containers=1)


def sentences_and_phrases(n: int) -> Records:
    """n sentences of eight words, each followed by two of its phrases; labels alternate per sentence."""
    texts, labels = [], []
    for i in range(n):
        words = [f"w{i}x{j}" for j in range(8)]
        for text in (" ".join(words), " ".join(words[2:6]), words[3]):
            texts.append(text)
            labels.append(str(i % 2))
    return Records(texts, labels, list(range(1, len(texts) + 1)))


@pytest.mark.parametrize("strategy", ["stratified", "random", "contiguous"])
def test_groups_never_cross_splits_and_the_split_is_deterministic(strategy):
    records = sentences_and_phrases(60)
    cfg = SplitConfig(seed=4, strategy=strategy, validation=0.2, test=0.2)
    splits, _, grouping = split_records(records, cfg, KEY, "data.tsv")
    report = grouping.report
    again, _, _ = split_records(records, cfg, KEY, "data.tsv")
    assert {n: splits[n].rows for n in SPLITS} == {n: again[n].rows for n in SPLITS}
    # each sentence's three rows are in one split, and the sizes are counted in rows (12 sentences = 36 rows)
    owner = {}
    for name in SPLITS:
        for row in splits[name].rows:
            owner.setdefault((row - 1) // 3, set()).add(name)
    assert all(len(names) == 1 for names in owner.values())
    assert [len(splits[n]) for n in SPLITS] == [108, 36, 36]
    # each split marks its whole sentences (one row in three), with the rows they came with
    for name in SPLITS:
        assert splits[name].whole == [(row - 1) % 3 == 0 for row in splits[name].rows]
    assert report["groups"] == 60 and report["largest_groups"][0] == 3
    for name in ("validation", "test"):
        assert leakage(splits["train"].texts, splits[name].texts, KEY, SETTINGS)["any"]["rows"] == 0
    if strategy == "contiguous":
        return  # in file order a sentence's phrases follow it, and the cut here falls between sentences
    # by text alone the phrases go their own way: the same seed leaks
    plain = cfg.model_copy(update={"overlap": OverlapConfig(containment=False, near_duplicates=False)})
    leaky, _, _ = split_records(records, plain, KEY, "data.tsv")
    assert leakage(leaky["train"].texts, leaky["test"].texts, KEY, SETTINGS)["any"]["rows"] > 0


def test_a_group_larger_than_a_split_goes_to_train():
    texts = [" ".join(f"w{j}" for j in range(k)) for k in range(1, 21)] + [f"other text number {i}" for i in range(80)]
    records = Records(texts, None, list(range(1, 101)))
    splits, _, _ = split_records(records, SplitConfig(strategy="random", test=0.1, validation=0.1), KEY, "c.txt")
    assert set(texts[:20]) <= set(splits["train"].texts)  # 20 rows in one group, over test's 10
    assert len(splits["test"]) == len(splits["validation"]) == 10


def test_leakage_counts_each_kind_of_overlap():
    train = ["a warm and sincere film about growing up", "the plot never comes together", "short"]
    test = [
        "a warm and sincere film",  # inside a training text
        "frankly , the plot never comes together at all",  # contains one of 5 words
        "short and sweet",  # contains one, but of 1 word (under min_words 3): not counted
        "a warm and sincere film about growing old",  # near-duplicate: 6 of 8 shingles shared
        "nothing in common here",
    ]
    found = leakage(train, test, KEY, resolve(OverlapConfig(similarity=0.6), causal_lm=False))
    assert found["rows"] == 5
    assert found["inside_a_training_text"] == {"rows": 1, "share": 0.2}
    assert found["contains_a_training_text"] == {"rows": 1, "share": 0.2}
    assert found["near_duplicate_of_a_training_text"] == {"rows": 1, "share": 0.2}
    assert found["any"] == {"rows": 3, "share": 0.6}
    assert found["examples"] == test[:2] + [test[3]]
    assert leakage(train, [], KEY, SETTINGS) == {"rows": 0}


def test_causal_lm_defaults_ask_for_longer_phrases_and_shingles():
    lm, classification = resolve(OverlapConfig(), causal_lm=True), resolve(OverlapConfig(), causal_lm=False)
    assert (lm.min_words, lm.shingle_words) == (8, 5)
    assert (classification.min_words, classification.shingle_words) == (3, 3)
    assert resolve(OverlapConfig(min_words=4, shingle_words=2), causal_lm=True).min_words == 4


def test_texts_of_the_same_words_are_one_group_whatever_their_spacing():
    keep_punctuation = normalizer(NormalizeConfig(strip_punctuation=False))
    texts = ["It's the film.", "it 's the film .", "the film", "a review"]  # two keys, one word sequence
    grouping = group_rows(texts, keep_punctuation, SETTINGS)
    assert sorted(grouping.groups) == [[0, 1, 2], [3]]  # and "the film" inside both, as words


def test_without_containment_no_row_is_marked_whole_or_not():
    assert group_rows(["a b c", "b c"], KEY, resolve(OverlapConfig(containment=False), causal_lm=False)).whole is None
