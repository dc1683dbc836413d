"""Every loader on small files written here in the corpus's original raw format, and malformed input."""
import csv
import gzip
import json

import pytest

from bench_suite.data import DataError, MissingData, load_task


def write_csv(path, header, rows, delimiter=","):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def root(tmp_path):
    return tmp_path


def raw(root, corpus):
    return root / "peftu" / "raw" / corpus


def test_hatexplain_original_dataset_json(root):
    d = raw(root, "hatexplain")
    d.mkdir(parents=True)
    data = {"p1": {"post_id": "p1", "post_tokens": ["you", "are", "bad"], "rationales": [],
                   "annotators": [{"label": "offensive", "annotator_id": 4, "target": ["None"]},
                                  {"label": "normal", "annotator_id": 7, "target": ["None"]}]},
            "p2": {"post_id": "p2", "post_tokens": ["hi"], "rationales": [],
                   "annotators": [{"label": "hatespeech", "annotator_id": 4, "target": ["X"]}]}}
    (d / "dataset.json").write_text(json.dumps(data))
    t = load_task("hatexplain", root)
    assert t.partial is None
    assert t.users == {"4": {"p1": {"text": "you are bad", "label": ["offensive"]}, "p2": {"text": "hi", "label": ["hatespeech"]}},
                       "7": {"p1": {"text": "you are bad", "label": ["normal"]}}}


def test_measuringhatespeech_parquet(root):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is needed to write the parquet fixture")
    import pyarrow.parquet as pq
    d = raw(root, "measuringhatespeech")
    d.mkdir(parents=True)
    tab = pa.table({"comment_id": [10, 10, 11], "annotator_id": [1, 2, 1], "text": ["a", "a", "b"],
                    "hatespeech": [0.0, 2.0, 1.0], "other": [0, 0, 0]})
    pq.write_table(tab, d / "measuring-hate-speech.parquet")
    t = load_task("measuringhatespeech", root)
    assert t.users == {"1": {"10": {"text": "a", "label": ["0"]}, "11": {"text": "b", "label": ["1"]}},
                       "2": {"10": {"text": "a", "label": ["2"]}}}


def test_gabhate_by_position_and_overwrite(root):
    write_csv(raw(root, "gabhate") / "GabHateCorpus_annotations.tsv", ["ID", "Annotator", "Text", "Hate", "HD"],
              [["1", "a", "x", "0", "0"], ["2", "a", "y", "1", "1"], ["1", "a", "x", "1", "0"]], "\t")
    t = load_task("gabhate", root)
    assert t.users == {"a": {"1": {"text": "x", "label": ["Hateful"]}, "2": {"text": "y", "label": ["Hateful"]}}}


def test_tweeteval_column_index_users(root):
    write_csv(raw(root, "tweeteval") / "annotations_g3.csv", ["id", "text", "label_M_1", "label_F_2"],
              [["5", "t5", "Hateful", "Non-hateful"]])
    t = load_task("tweeteval", root)
    assert t.users == {"0": {"5": {"text": "t5", "label": ["Hateful"]}}, "1": {"5": {"text": "t5", "label": ["Non-hateful"]}}}


def test_unhealthy_keeps_first_judgement(root):
    h = ["_unit_id", "comment", "_trust", "_worker_id", "a", "b", "c", "d", "e", "healthy"]
    write_csv(raw(root, "unhealthyconversations") / "unhealthy_full.csv", h,
              [["u1", "c1", "0.9", "w", "", "", "", "", "", "1"], ["u1", "c1", "0.9", "w", "", "", "", "", "", "0"],
               ["u2", "c2", "0.9", "w", "", "", "", "", "", "0"]])
    t = load_task("unhealthyconversations", root)
    assert t.users == {"w": {"u1": {"text": "c1", "label": ["healthy"]}, "u2": {"text": "c2", "label": ["unhealthy"]}}}


def test_wikidetox_join_and_float_labels(root):
    d = raw(root, "wikidetox")
    write_csv(d / "aggression_annotations.tsv", ["rev_id", "worker_id", "aggression", "aggression_score"],
              [["37675", "1362", "1.0", "-1.0"], ["37675", "1362", "0.0", "0.0"], ["44816", "9", "0.0", "1.0"]], "\t")
    write_csv(d / "aggression_annotated_comments.tsv", ["rev_id", "comment", "year"],
              [["37675", "NEWLINE_TOKEN hey", "2002"], ["44816", "fine", "2002"]], "\t")
    t = load_task("wikidetox", root)
    assert t.users == {"1362": {"37675": {"text": "NEWLINE_TOKEN hey", "label": ["Aggressive"]}},
                       "9": {"44816": {"text": "fine", "label": ["Normal"]}}}


GOE = ["admiration", "amusement", "anger", "annoyance", "approval", "caring", "confusion", "curiosity", "desire",
       "disappointment", "disapproval", "disgust", "embarrassment", "excitement", "fear", "gratitude", "grief", "joy",
       "love", "nervousness", "optimism", "pride", "realization", "relief", "remorse", "sadness", "surprise", "neutral"]


def goe_row(text, cid, rater, marked):
    return [text, cid, "au", "sub", "l", "p", "0", rater, "False"] + ["1" if e in marked else "0" for e in GOE]


def test_goemotion_full_release(root):
    d = raw(root, "goemotion")
    head = ["text", "id", "author", "subreddit", "link_id", "parent_id", "created_utc", "rater_id",
            "example_very_unclear"] + GOE
    write_csv(d / "goemotions_1.csv", head, [goe_row("t1", "c1", "r1", ["amusement", "anger", "joy"]),
                                             goe_row("t1", "c1", "r1", ["fear"]),           # second rating: dropped
                                             goe_row("t2", "c2", "r1", ["joy", "neutral"]),  # neutral: dropped
                                             goe_row("t3", "c3", "r1", [])])                 # unclear: dropped
    write_csv(d / "goemotions_2.csv", head, [goe_row("t2", "c2", "r2", ["curiosity"])])
    write_csv(d / "goemotions_3.csv", head, [])
    (d / "ekman_mapping.json").write_text(json.dumps({"anger": ["anger", "annoyance", "disapproval"], "disgust": ["disgust"],
        "fear": ["fear", "nervousness"], "joy": ["joy", "amusement", "approval", "excitement", "gratitude", "love", "optimism",
        "relief", "pride", "admiration", "desire", "caring"], "sadness": ["sadness", "disappointment", "embarrassment",
        "grief", "remorse"], "surprise": ["surprise", "realization", "confusion", "curiosity"]}))
    t = load_task("goemotion", root)
    assert t.partial is None
    assert t.users == {"r1": {"c1": {"text": "t1", "label": ["anger", "joy"]}},
                       "r2": {"c2": {"text": "t2", "label": ["surprise"]}}}


def test_cockamamie_no_then_yes(root):
    d = raw(root, "cockamamie")
    d.mkdir(parents=True)
    votes = [{"gobbledegook": {"no_votes": ["v1", "v2"], "yes_votes": ["v2"]}}, {"snorkel": {"no_votes": [], "yes_votes": ["v1"]}}]
    (d / "cockamamie.json").write_text(json.dumps({"word_ratings": {"votes": votes}, "other": 1}))
    t = load_task("cockamamie", root)
    assert t.users == {"v1": {"0": {"text": "gobbledegook", "label": ["no"]}, "1": {"text": "snorkel", "label": ["yes"]}},
                       "v2": {"0": {"text": "gobbledegook", "label": ["yes"]}}}


def test_epic_text_format(root):
    write_csv(raw(root, "epic") / "EPICorpus.csv", ["id_original", "user", "parent_text", "text", "label", "Sex"],
              [["9", "ab1", "Nice day", "Sure it is", "iro", "F"]])
    t = load_task("epic", root)
    assert t.users == {"ab1": {"9": {"text": 'message: "Nice day"\n\nreply: "Sure it is"', "label": ["Ironic"]}}}


def test_studemo_valence_and_gz(root):
    d = raw(root, "studemo")
    dims = ["joy", "trust", "anticipation", "surprise", "fear", "sadness", "disgust", "anger", "valence", "arousal"]
    p = write_csv(d / "annotation_data.csv", ["text_id", "annotator_id"] + dims,
                  [["0", "3", "1.0", "0", "0", "0", "0", "0", "0", "2.0", "-2.0", "1.0"],
                   ["1", "3", "0", "0", "0", "0", "0", "0", "0", "0", "-3.0", "0"]])
    gz = d / "annotation_data.csv.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    p.unlink()
    write_csv(d / "text_data.csv", ["text_id", "text"], [["0", "a"], ["1", "b"]])
    t = load_task("studemo", root)
    assert t.users == {"3": {"0": {"text": "a", "label": ["joy", "anger", "arousal"]}}}


def test_missing_corpus_names_files_and_release(root):
    with pytest.raises(MissingData, match=r"epic.*EPICorpus.csv.*public release"):
        load_task("epic", root)


def test_malformed_inputs_name_file_row_and_problem(root):
    write_csv(raw(root, "epic") / "EPICorpus.csv", ["id_original", "user", "parent_text", "text", "label"],
              [["1", "u", "p", "t", "iro"], ["2", "u", "p", "t", "maybe"]])
    with pytest.raises(DataError, match=r"EPICorpus.csv: row 3: bad label value 'maybe'"):
        load_task("epic", root)
    write_csv(raw(root, "epic") / "EPICorpus.csv", ["id_original", "user", "text", "label"], [["1", "u", "t", "iro"]])
    with pytest.raises(DataError, match=r"EPICorpus.csv: missing column\(s\) \['parent_text'\]"):
        load_task("epic", root)
    d = raw(root, "subjectivediscourse")
    d.mkdir(parents=True)
    (d / "gold_full_data.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(DataError, match="gold_full_data.tar.gz: unreadable archive"):
        load_task("subjectivediscourse_response", root)
    (raw(root, "studemo")).mkdir(parents=True)
    (raw(root, "studemo") / "annotation_data.csv.gz").write_bytes(b"\x1f\x8b broken")
    write_csv(raw(root, "studemo") / "text_data.csv", ["text_id", "text"], [["0", "a"]])
    with pytest.raises(DataError, match="annotation_data.csv.gz: unreadable"):
        load_task("studemo", root)


def test_lewidi_bad_label(root):
    d = root / "lewidi" / "raw" / "ArMIS"
    d.mkdir(parents=True)
    item = {"text": "x", "annotations": "0,7", "annotators": "Ann1,Ann2", "annotation task": "", "lang": "ar",
            "number of annotations": 2, "hard_label": "0", "soft_label": {}, "split": "train", "other_info": {}}
    for sp in ("train", "dev", "test"):
        (d / f"ArMIS_{sp}.json").write_text(json.dumps({"1": item}))
    with pytest.raises(DataError, match=r"ArMIS_train.json: item 1: bad label value '7'"):
        load_task("armis", root)
