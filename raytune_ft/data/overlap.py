"""Overlap between rows: which texts contain one another as word sequences, and which nearly repeat one another.

Splitting by exact (normalised) text is not enough for data like SST-2, whose rows are a sentence and the phrases
cut from it: the test split then holds phrases of training sentences, and sentences whose phrases were trained on.
`group_rows` puts such rows in one group, which the splitter never divides; `leakage` measures what still overlaps
between two splits.

Two well-kept libraries do the searching, each where it fits:
- containment: an Aho-Corasick automaton (pyahocorasick, C) of every text finds every text inside every other in one
  pass per text; SST-2's 67k rows are scanned in about a second, where all word n-grams of each row looked up in a
  dict would be quadratic in a row's length;
- near-duplicates: MinHash LSH (datasketch) over word shingles proposes pairs down to well below the threshold,
  and each proposal is kept only if the shingle sets' exact Jaccard similarity reaches it: no pair below the
  threshold is grouped, and a pair above it is missed only in the rare case that LSH proposes it nowhere.

Common phrases must not chain every sentence into one group ("the film" sits inside thousands of SST-2 rows). A
contained text links to the texts around it only when it has one maximal container (a text no other text
contains), or when it is at least `min_words` words long and has at most `max_containers` maximal containers. Any
other contained text is a common phrase: it links nothing and is kept in the training split, where it cannot leak.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from raytune_ft.config.schema import OverlapConfig

_TOKEN = re.compile(r"\w+|[^\w\s]")
_WORD = re.compile(r"\w")
# MinHash permutations: 64 estimate a Jaccard of 0.8 within about ±0.05, and every proposal is checked exactly
_PERMUTATIONS = 64
MAX_EXAMPLES = 5


@dataclass(frozen=True)
class OverlapSettings:
    """OverlapConfig with its automatic values filled in for the task."""

    containment: bool
    near_duplicates: bool
    min_words: int
    max_containers: int
    similarity: float
    shingle_words: int
    warn_above: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def resolve(cfg: OverlapConfig, causal_lm: bool) -> OverlapSettings:
    """Classification rows are sentences and phrases; a causal-LM corpus is paragraphs, where a few words in common
    (a greeting, a stage direction) say nothing, so its phrases and shingles are longer."""
    return OverlapSettings(
        containment=cfg.containment,
        near_duplicates=cfg.near_duplicates,
        min_words=cfg.min_words or (8 if causal_lm else 3),
        max_containers=cfg.max_containers,
        similarity=cfg.similarity,
        shingle_words=cfg.shingle_words or (5 if causal_lm else 3),
        warn_above=cfg.warn_above,
    )


def words(key: str) -> str:
    """A normalised text as space-separated tokens (punctuation apart), the form in which texts contain each
    other: "the film" is inside "the film." but not inside "the filmmaker"."""
    return " ".join(_TOKEN.findall(key))


def word_count(tokens: str) -> int:
    return sum(1 for token in tokens.split() if _WORD.match(token))


@dataclass
class Grouping:
    """Groups of row indices that must share a split, and the rows of common phrases (training split only)."""

    groups: list[list[int]]
    common: list[int]
    report: dict[str, Any] = field(default_factory=dict)
    # per row: no other row's text contains it (for SST-2, the whole sentences); None with containment off
    whole: list[bool] | None = None


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def _automaton(patterns: Sequence[str]) -> Any:
    import ahocorasick

    automaton = ahocorasick.Automaton()
    for i, pattern in enumerate(patterns):
        if pattern:
            automaton.add_word(f" {pattern} ", i)
    automaton.make_automaton()
    return automaton


def _found_in(automaton: Any, text: str) -> set[int]:
    return {i for _, i in automaton.iter(f" {text} ")} if text else set()


def group_rows(texts: Sequence[str], key: Callable[[str], str], settings: OverlapSettings) -> Grouping:
    """Rows with the same normalised words are one group; with containment and near-duplicates on, so are a text and
    the texts inside it (bounded as the module says) and texts whose shingles are `similarity` alike."""
    by_words: dict[str, list[int]] = defaultdict(list)
    for i, text in enumerate(texts):
        by_words[words(key(text))].append(i)
    uniques = list(by_words.values())  # one entry per distinct word sequence, in order of first row
    tokens = list(by_words)
    union = _UnionFind(len(uniques))
    common: set[int] = set()
    report: dict[str, Any] = {"settings": settings.as_dict(), "distinct_texts": len(uniques)}
    whole: list[bool] | None = None

    if settings.containment:
        linked, common, contained = _link_contained(tokens, settings, union)
        whole = [True] * len(texts)
        for u in contained:
            for i in uniques[u]:
                whole[i] = False
        report["containment"] = {
            "texts_linked": linked,
            "common_phrases": len(common),
            "common_phrase_rows": sum(len(uniques[u]) for u in common),
            "common_phrase_examples": sorted((tokens[u] for u in common), key=lambda t: (-len(t), t))[:MAX_EXAMPLES],
        }
    if settings.near_duplicates:
        pairs = _link_near_duplicates(tokens, settings, union, skip=common)
        report["near_duplicates"] = {"pairs_linked": pairs}

    members: dict[int, list[int]] = defaultdict(list)
    for u, rows in enumerate(uniques):
        if u not in common:
            members[union.find(u)].extend(rows)
    groups = sorted((sorted(rows) for rows in members.values()), key=lambda rows: rows[0])
    sizes = sorted((len(g) for g in groups), reverse=True)
    report.update(groups=len(groups), largest_groups=sizes[:5], rows_grouped=sum(s for s in sizes if s > 1))
    if whole is not None:
        report["whole_rows"] = sum(whole)
    return Grouping(groups, sorted(i for u in common for i in uniques[u]), report, whole)


def _link_contained(tokens: list[str], settings: OverlapSettings, union: _UnionFind) -> tuple[int, set[int], set[int]]:
    """Union each contained text with its maximal containers, within the bounds; (texts linked, common phrases,
    every text inside another)."""
    automaton = _automaton(tokens)
    inside = [_found_in(automaton, text) - {u} for u, text in enumerate(tokens)]
    contained = set().union(*inside) if inside else set()
    roots_of: dict[int, list[int]] = defaultdict(list)
    for root, found in enumerate(inside):
        if root not in contained:
            for u in found:
                roots_of[u].append(root)
    linked, common = 0, set()
    for u in sorted(contained):
        roots = roots_of[u]
        long_enough = word_count(tokens[u]) >= settings.min_words
        if len(roots) == 1 or (long_enough and len(roots) <= settings.max_containers):
            for root in roots:
                union.union(u, root)
            linked += 1
        else:
            common.add(u)
    return linked, common, contained


def shingles(tokens: str, size: int) -> set[str]:
    parts = tokens.split()
    if len(parts) < size:
        return {tokens} if tokens else set()
    return {" ".join(parts[i : i + size]) for i in range(len(parts) - size + 1)}


def _shingled(tokens: Sequence[str], size: int, skip: set[int] = frozenset()) -> tuple[list[int], list[set[str]]]:
    """The texts long enough to have shingles of SIZE words (shorter ones can only equal one another, which their
    word sequence already groups): their indices and shingle sets."""
    index = [i for i, t in enumerate(tokens) if i not in skip and len(t.split()) >= size]
    return index, [shingles(tokens[i], size) for i in index]


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def _minhashes(shingle_sets: list[set[str]]) -> list[Any]:
    from datasketch import MinHash

    return MinHash.bulk([[s.encode() for s in sorted(sets)] for sets in shingle_sets], num_perm=_PERMUTATIONS)


def _lsh(similarity: float) -> Any:
    """An index that proposes pairs down to well below SIMILARITY, weighted against misses: LSH finds a pair just
    above its threshold only by chance, and proposals below SIMILARITY are discarded by the exact check anyway."""
    from datasketch import MinHashLSH

    return MinHashLSH(threshold=max(0.05, similarity * 0.75), num_perm=_PERMUTATIONS, weights=(0.2, 0.8))


def _link_near_duplicates(tokens: list[str], settings: OverlapSettings, union: _UnionFind, skip: set[int]) -> int:
    """Union texts whose shingle sets have Jaccard similarity >= settings.similarity; the pairs linked."""
    candidates, sets = _shingled(tokens, settings.shingle_words, skip)
    lsh = _lsh(settings.similarity)
    pairs = 0
    for position, minhash in enumerate(_minhashes(sets)):
        here = candidates[position]
        for other in lsh.query(minhash):
            there = candidates[other]
            if union.find(here) != union.find(there) and jaccard(sets[position], sets[other]) >= settings.similarity:
                union.union(here, there)
                pairs += 1
        lsh.insert(position, minhash)
    return pairs


class TrainingText:
    """A training split indexed once (an automaton of its longer texts, MinHash LSH of its shingles), against which
    any number of other splits or files are measured with `overlap`."""

    def __init__(self, train: Sequence[str], key: Callable[[str], str], settings: OverlapSettings) -> None:
        self.key, self.settings = key, settings
        self.tokens = sorted({words(key(t)) for t in train})
        self.long = _automaton([t if word_count(t) >= settings.min_words else "" for t in self.tokens])
        _, self.sets = _shingled(self.tokens, settings.shingle_words)
        self.lsh = _lsh(settings.similarity)
        for position, minhash in enumerate(_minhashes(self.sets)):
            self.lsh.insert(position, minhash)

    def overlap(self, other: Sequence[str]) -> dict[str, Any]:
        """How many of OTHER's rows overlap a training row: inside a training text (word-level), containing a
        training text of `min_words` words or more, or a near-duplicate of one (shingle Jaccard >= `similarity`)."""
        tokens = [words(self.key(t)) for t in other]
        result: dict[str, Any] = {"rows": len(tokens)}
        if not tokens:
            return result
        containing = {i for i, t in enumerate(tokens) if _found_in(self.long, t)}
        within_train = _automaton(tokens)
        inside: set[int] = set()
        for text in self.tokens:
            inside |= _found_in(within_train, text)
        near = self._near_duplicates(tokens)
        found = inside | containing | near
        for name, rows in (
            ("inside_a_training_text", inside),
            ("contains_a_training_text", containing),
            ("near_duplicate_of_a_training_text", near),
            ("any", found),
        ):
            result[name] = {"rows": len(rows), "share": round(len(rows) / len(tokens), 4)}
        result["examples"] = [other[i] for i in sorted(found)[:MAX_EXAMPLES]]
        return result

    def _near_duplicates(self, tokens: list[str]) -> set[int]:
        similarity = self.settings.similarity
        index, sets = _shingled(tokens, self.settings.shingle_words)
        if not self.sets or not sets:
            return set()
        found = set()
        for position, minhash in enumerate(_minhashes(sets)):
            if any(jaccard(sets[position], self.sets[t]) >= similarity for t in self.lsh.query(minhash)):
                found.add(index[position])
        return found


def leakage(train: Sequence[str], other: Sequence[str], key: Callable[[str], str], settings: OverlapSettings) -> dict:
    """TrainingText(TRAIN).overlap(OTHER), for one measurement."""
    return TrainingText(train, key, settings).overlap(other)
