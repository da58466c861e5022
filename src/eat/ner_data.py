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
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import DataError, batch_order
from .tasks import OWN_TOKEN_TASK, TOKEN_TASK_NAMES, is_token_task  # noqa: F401 - is_token_task: eat.deploy's import

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


# ------------------------------------------------------------------------------------------------ token tasks

# "conll2003": CoNLL-2003 English from a local folder; "ner": your own files (--data-file / --eval-file, CoNLL
# columns with the tag last, or JSONL {tokens, tags}). eat.tasks names them (TOKEN_TASK_NAMES, OWN_TOKEN_TASK).
TOKEN_TASKS = TOKEN_TASK_NAMES + (OWN_TOKEN_TASK.name,)
_CONLL_FILES = {"train": ("eng.train", "train.txt"), "validation": ("eng.testa", "valid.txt", "dev.txt"),
                "test": ("eng.testb", "test.txt")}


def conll_dir() -> Path:
    """The CoNLL-2003 folder: ``EAT_CONLL_DIR`` if set, else ``conll2003`` beside ``EAT_DATA_DIR`` (the GLUE folder).
    Raises DataError naming what was looked for (CoNLL-2003 is licensed data and is never downloaded here)."""
    value = os.environ.get("EAT_CONLL_DIR")
    if value:
        path = Path(value)
        if not path.is_dir():
            raise DataError(f"EAT_CONLL_DIR={value}: no such directory")
        return path
    glue = os.environ.get("EAT_DATA_DIR")
    if glue and (Path(glue).parent / "conll2003").is_dir():
        return Path(glue).parent / "conll2003"
    raise DataError("CoNLL-2003 not found: set EAT_CONLL_DIR to the folder with eng.train and eng.testa "
                    "(or EAT_DATA_DIR to a GLUE folder that has conll2003/ beside it)")


@dataclass
class TaggedData:
    """Sentences of one split with the task's label names and where they came from."""

    sentences: list[TaggedSentence]
    label_names: tuple[str, ...]
    source: str
    note: str = ""

    def __len__(self) -> int:
        return len(self.sentences)

    def subset(self, limit: int | None, seed: int = 0) -> "TaggedData":
        """A seeded random sample of ``limit`` sentences (all when ``limit`` is None or larger), in file order."""
        if limit is None or limit >= len(self.sentences):
            return self
        chosen = sorted(random.Random(seed).sample(range(len(self.sentences)), limit))
        return TaggedData([self.sentences[i] for i in chosen], self.label_names, self.source,
                          (self.note + f"; seeded sample of {limit}").strip("; "))

    def split_off(self, rows: int, seed: int = 0) -> tuple["TaggedData", "TaggedData"]:
        """(rest, held out): a seeded slice of ``rows`` sentences held out (for choosing operating points)."""
        order = list(range(len(self.sentences)))
        random.Random(seed).shuffle(order)
        held, rest = sorted(order[:rows]), sorted(order[rows:])
        return (TaggedData([self.sentences[i] for i in rest], self.label_names, self.source, self.note),
                TaggedData([self.sentences[i] for i in held], self.label_names, self.source,
                           f"calibration slice ({rows} sentences, seed {seed}) of {self.source}"))


def read_tagged(path: str | Path, labels: tuple[str, ...] | None = None) -> list[TaggedSentence]:
    """Sentences from a CoNLL file (tag in the last of 4 columns) or a ``.jsonl`` file of ``{tokens, tags}``."""
    if str(path).endswith((".jsonl", ".json")):
        return read_tagged_jsonl(path, labels)
    return read_conll(path, labels)


def load_tagged(task: str, split: str, data_file: str | None = None,
                label_names: tuple[str, ...] | None = None) -> TaggedData:
    """A split of a token task: CoNLL-2003 (``conll2003``, BIO labels of its four entity types) or a user file."""
    if data_file is not None:
        sentences = read_tagged(data_file, label_names)
        names = label_names or ("O",) + tuple(sorted({tag for s in sentences for tag in s.tags} - {"O"}))
        return TaggedData(sentences, names, str(data_file))
    if task != "conll2003":
        raise DataError(f"task {task!r} needs --data-file (and --eval-file) with your own tagged sentences")
    root = conll_dir()
    for name in _CONLL_FILES.get(split, ()):
        if (root / name).is_file():
            return TaggedData(read_conll(root / name), CONLL_LABELS, str(root / name), "IOB1 converted to BIO")
    raise DataError(f"{root}: no file for CoNLL-2003 split {split!r} "
                    f"(looked for {', '.join(_CONLL_FILES.get(split, ('?',)))})")


@dataclass
class EncodedTagged:
    """Subword ids per chunk (a sentence longer than the limit becomes several chunks), per-subword label ids
    (IGNORE except on first subwords), which sentence every chunk belongs to, and its length."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    word_starts: list[list[bool]]
    sentence: list[int]
    lengths: list[int] = field(default_factory=list)
    split_sentences: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_tagged(data: TaggedData, tokenizer, max_length: int) -> EncodedTagged:
    """Align every sentence to subwords (:func:`align_to_subwords`); warn once with the count of sentences split
    into chunks because they are longer than ``max_length``."""
    label_to_id = {name: i for i, name in enumerate(data.label_names)}
    ids, labels, starts, sentence = [], [], [], []
    split = 0
    for number, tagged in enumerate(data.sentences):
        chunks = align_to_subwords(tagged, tokenizer, label_to_id, max_length, source=data.source)
        split += len(chunks) > 1
        for chunk in chunks:
            ids.append(chunk.input_ids)
            labels.append(chunk.labels)
            previous = None
            flags = []
            for word in chunk.word_ids:
                flags.append(word is not None and word != previous)
                previous = word
            starts.append(flags)
            sentence.append(number)
    if split:
        logger.warning("%s: %d of %d sentences are longer than %d subwords and were split into chunks at word "
                       "boundaries (no label dropped)", data.source, split, len(data.sentences), max_length)
    return EncodedTagged(ids, labels, starts, sentence, [len(row) for row in ids], split)


def collate_tagged(encoded: EncodedTagged, rows, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad the given chunks: input_ids, attention_mask, token_type_ids, labels (IGNORE on padding),
    word_mask (first subwords), index."""
    width = max(encoded.lengths[r] for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    word_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        n = encoded.lengths[r]
        ids[i, :n] = torch.tensor(encoded.input_ids[r])
        labels[i, :n] = torch.tensor(encoded.labels[r])
        word_mask[i, :n] = torch.tensor(encoded.word_starts[r])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "labels": labels,
            "word_mask": word_mask, "index": torch.tensor(list(rows))}


def tagged_batches(encoded: EncodedTagged, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                   bucket: bool = True, pad_id: int = 0):
    """Dynamically padded batches of chunks in :func:`eat.data.batch_order`."""
    for chunk in batch_order(encoded.lengths, batch_size, shuffle=shuffle, seed=seed, bucket=bucket):
        yield collate_tagged(encoded, chunk, pad_id)


def entity_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 (percent) with seqeval (conlleval's definition)."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    return {"precision": 100.0 * float(precision_score(gold, predicted)),
            "recall": 100.0 * float(recall_score(gold, predicted)), "f1": 100.0 * float(f1_score(gold, predicted))}


__all__ = ["TaggedSentence", "AlignedSentence", "TaggedData", "EncodedTagged", "read_conll", "read_tagged_jsonl",
           "read_tagged", "load_tagged", "iob1_to_bio", "align_to_subwords", "encode_tagged", "collate_tagged",
           "tagged_batches", "entity_scores", "is_token_task", "conll_dir", "CONLL_LABELS", "IGNORE", "TOKEN_TASKS"]
