"""CoNLL-2003 reading, IOB1 -> BIO, subword alignment, entity F1 (groundwork of the NER task)."""

from __future__ import annotations

import pytest

from eat.data import DataError
from eat.ner_data import (CONLL_LABELS, IGNORE, TaggedSentence, align_to_subwords, entity_scores, iob1_to_bio,
                          read_conll, read_tagged_jsonl)

from .conftest import CONLL_DIR


def test_iob1_to_bio_hand_made_cases():
    assert iob1_to_bio(["I-ORG", "O", "I-MISC", "O"]) == ["B-ORG", "O", "B-MISC", "O"]
    assert iob1_to_bio(["I-PER", "I-PER", "B-PER", "I-PER"]) == ["B-PER", "I-PER", "B-PER", "I-PER"]
    assert iob1_to_bio(["I-LOC", "I-ORG"]) == ["B-LOC", "B-ORG"]  # type change starts a new entity
    bio = ["B-PER", "I-PER", "O", "B-LOC"]
    assert iob1_to_bio(bio) == bio  # BIO input is left alone


def test_read_real_conll_dev_slice():
    path = CONLL_DIR / "eng.testa"
    if not path.is_file():
        pytest.skip("CoNLL-2003 not found beside the project")
    sentences = read_conll(path)
    assert len(sentences) == 3250
    assert sum(len(s.tokens) for s in sentences) == 51362
    for sentence in sentences[:200]:
        for previous, tag in zip(["O"] + sentence.tags, sentence.tags):
            if tag.startswith("I-"):
                assert previous[2:] == tag[2:]  # valid BIO everywhere


def test_malformed_conll_lines_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.conll"
    bad.write_text("-DOCSTART- -X- O O\n\nEU NNP I-NP I-ORG\nrejects VBZ I-VP\n")
    with pytest.raises(DataError, match=r"bad.conll:4: expected 4 columns"):
        read_conll(bad)
    unknown = tmp_path / "unknown.conll"
    unknown.write_text("EU NNP I-NP I-COMPANY\n")
    with pytest.raises(DataError, match=r"unknown.conll:1: unknown tag 'I-COMPANY'"):
        read_conll(unknown)
    empty = tmp_path / "empty.conll"
    empty.write_text("-DOCSTART- -X- O O\n\n")
    with pytest.raises(DataError, match="no sentences"):
        read_conll(empty)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"tokens": ["a", "b"], "tags": ["O"]}\n')
    with pytest.raises(DataError, match=r"d.jsonl:1: 2 tokens but 1 tags"):
        read_tagged_jsonl(jsonl)


def test_first_subword_alignment_and_long_sentence_split(backbone_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(backbone_path)
    label_to_id = {tag: i for i, tag in enumerate(CONLL_LABELS)}
    sentence = TaggedSentence(["Wolfgangsee", "is", "in", "Austria"], ["B-LOC", "O", "O", "B-LOC"], 1)
    [aligned] = align_to_subwords(sentence, tokenizer, label_to_id, 64)
    labelled = [(i, l) for i, l in enumerate(aligned.labels) if l != IGNORE]
    assert [CONLL_LABELS[l] for _, l in labelled] == ["B-LOC", "O", "O", "B-LOC"]
    assert aligned.labels[0] == IGNORE and aligned.labels[-1] == IGNORE
    assert len(aligned.input_ids) > 6  # "wolfgangsee" is several subwords, only the first carries the label
    long = TaggedSentence(["word"] * 30, ["O"] * 30, 7)
    chunks = align_to_subwords(long, tokenizer, label_to_id, 12)
    assert len(chunks) == 3 and all(len(c.input_ids) <= 12 for c in chunks)
    assert sum(l != IGNORE for c in chunks for l in c.labels) == 30  # no label dropped


def test_entity_f1_on_known_examples():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    assert entity_scores(gold, gold)["f1"] == pytest.approx(100.0)
    predicted = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "O"]]  # found 2 of 3, no false positives
    scores = entity_scores(gold, predicted)
    assert scores["precision"] == pytest.approx(100.0) and scores["recall"] == pytest.approx(200 / 3)
    assert scores["f1"] == pytest.approx(80.0)
    boundary = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "O"]]  # wrong span is both a miss and a false positive
    assert entity_scores(gold, boundary)["f1"] == pytest.approx(200 / 3)
