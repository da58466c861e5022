"""Sequence-labeling data: CoNLL-2003 (4-column, IOB1) and JSONL ``{tokens, tags}``, converted to BIO (IOB2),
aligned to subwords, and scored at entity level.

Decisions:
- tags are converted to BIO on reading (IOB1 ``I-X`` that starts an entity becomes ``B-X``); a file already in BIO
  is unchanged by the conversion, so both schemes load the same way;
- only the first subword of a word carries its label; the other subwords get ``IGNORE`` (-100) and their
  predictions are never read (word-level evaluation, as conlleval does);
- a sentence longer than the model's limit is split into consecutive chunks at word boundaries (with one warning
  per file), so no word and no label is ever dropped;
- entity-level precision/recall/F1 come from ``seqeval`` (the conlleval definition, BIO scheme, default mode).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .data import DataError

logger = logging.getLogger(__name__)
IGNORE = -100
ENTITY_TYPES = ("PER", "ORG", "LOC", "MISC")
CONLL_LABELS = ("O",) + tuple(f"{prefix}-{kind}" for kind in ENTITY_TYPES for prefix in ("B", "I"))


@dataclass
class TaggedSentence:
    """Words and their BIO tags, with where the sentence starts in its file (1-based line)."""

    tokens: list[str]
    tags: list[str]
    line: int = 0


def iob1_to_bio(tags: list[str]) -> list[str]:
    """Convert IOB1 tags to BIO (IOB2): an ``I-X`` that does not continue an entity of type X becomes ``B-X``.

    BIO input is returned unchanged. ``B-X`` in IOB1 (an entity right after another of the same type) stays ``B-X``.
    """
    converted = []
    previous = "O"
    for tag in tags:
        if tag.startswith("I-"):
            kind = tag[2:]
            if previous == "O" or previous[2:] != kind:
                tag = "B-" + kind
        converted.append(tag)
        previous = tag
    return converted


def _check_tag(tag: str, labels: tuple[str, ...] | None, where: str) -> None:
    if labels is not None and tag not in labels:
        raise DataError(f"{where}: unknown tag {tag!r} (known: {', '.join(labels)})")
    if labels is None and not (tag == "O" or (len(tag) > 2 and tag[:2] in ("B-", "I-"))):
        raise DataError(f"{where}: tag {tag!r} is not O, B-X or I-X")


def read_conll(path: str | Path, labels: tuple[str, ...] | None = CONLL_LABELS) -> list[TaggedSentence]:
    """Read a CoNLL-2003 file (``token POS chunk NER`` per line, blank lines between sentences, ``-DOCSTART-``
    lines between documents) into BIO-tagged sentences. Raises DataError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 text (invalid byte at line {line})") from None
    sentences: list[TaggedSentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("-DOCSTART-"):
            if tokens:
                sentences.append(TaggedSentence(tokens, iob1_to_bio(tags), start))
                tokens, tags = [], []
            continue
        columns = stripped.split()
        if len(columns) != 4:
            raise DataError(f"{path}:{number}: expected 4 columns (token POS chunk NER), got {len(columns)}: {line!r}")
        tag = columns[3]
        _check_tag(tag, labels, f"{path}:{number}")
        if not tokens:
            start = number
        tokens.append(columns[0])
        tags.append(tag)
    if tokens:
        sentences.append(TaggedSentence(tokens, iob1_to_bio(tags), start))
    if not sentences:
        raise DataError(f"{path}: no sentences")
    return sentences


def read_tagged_jsonl(path: str | Path, labels: tuple[str, ...] | None = None) -> list[TaggedSentence]:
    """Read JSONL lines ``{"tokens": [...], "tags": [...]}`` (IOB1 or BIO) into BIO-tagged sentences."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    sentences = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        tokens, tags = row.get("tokens"), row.get("tags")
        if not isinstance(tokens, list) or not isinstance(tags, list):
            raise DataError(f"{path}:{number}: needs lists 'tokens' and 'tags'")
        if len(tokens) != len(tags):
            raise DataError(f"{path}:{number}: {len(tokens)} tokens but {len(tags)} tags")
        if not tokens:
            raise DataError(f"{path}:{number}: empty sentence")
        for tag in tags:
            _check_tag(tag, labels, f"{path}:{number}")
        sentences.append(TaggedSentence([str(t) for t in tokens], iob1_to_bio([str(t) for t in tags]), number))
    if not sentences:
        raise DataError(f"{path}: no sentences")
    return sentences


@dataclass
class AlignedSentence:
    """Subword ids with a label id on the first subword of each word (IGNORE elsewhere) and each subword's word."""

    input_ids: list[int]
    labels: list[int]
    word_ids: list[int | None]
    source_line: int


def align_to_subwords(sentence: TaggedSentence, tokenizer, label_to_id: dict[str, int], max_length: int,
                      source: str = "") -> list[AlignedSentence]:
    """Tokenize a sentence's words and label the first subword of each; split into chunks of at most
    ``max_length`` subwords (special tokens included) at word boundaries when it is too long."""
    encoded = tokenizer(sentence.tokens, is_split_into_words=True, add_special_tokens=False)
    word_ids = encoded.word_ids()
    ids = encoded["input_ids"]
    budget = max_length - 2  # [CLS] and [SEP]
    chunks: list[tuple[int, int]] = []
    start = 0
    while start < len(ids):
        end = min(start + budget, len(ids))
        if end < len(ids):
            # back up to a word boundary so no word is cut
            while end > start and word_ids[end] == word_ids[end - 1]:
                end -= 1
            if end == start:
                raise DataError(f"{source}:{sentence.line}: a single word is longer than {budget} subwords")
        chunks.append((start, end))
        start = end
    results = []
    for start, end in chunks:
        labels, previous = [], None
        for position in range(start, end):
            word = word_ids[position]
            if word != previous:
                tag = sentence.tags[word]
                if tag not in label_to_id:
                    raise DataError(f"{source}:{sentence.line}: unknown tag {tag!r}")
                labels.append(label_to_id[tag])
            else:
                labels.append(IGNORE)
            previous = word
        results.append(AlignedSentence([tokenizer.cls_token_id] + ids[start:end] + [tokenizer.sep_token_id],
                                       [IGNORE] + labels + [IGNORE], [None] + word_ids[start:end] + [None],
                                       sentence.line))
    return results


def entity_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 (percent) with seqeval (conlleval's definition)."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    return {"precision": 100.0 * precision_score(gold, predicted), "recall": 100.0 * recall_score(gold, predicted),
            "f1": 100.0 * f1_score(gold, predicted)}


__all__ = ["TaggedSentence", "AlignedSentence", "read_conll", "read_tagged_jsonl", "iob1_to_bio",
           "align_to_subwords", "entity_scores", "CONLL_LABELS", "IGNORE"]
