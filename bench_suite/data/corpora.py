"""Loaders for PEFT-U's 11 corpora / 13 tasks, each from the corpus's original raw files (SPEC.md, section 1).

Where the shared data holds another form (HateXplain as HF split files, GoEmotions as a truncated head),
that form is read too and the task is marked partial. Label lists and instructions are data: verbatim.
"""
from __future__ import annotations

import ast
from pathlib import Path

from .core import DataError, MissingData, Task, Users, put
from .readers import load_json, parquet_rows, rows, tar_member

HATE_BIN = "Please review the following text and indicate if it has the presence of hate speech. Respond 'Hateful' if the text contains hate speech and 'Non-hateful' if the text does not contain hate speech."
SENT_LABELS = ["negative", "neutral", "positive", "somewhat-negative", "somewhat-positive", "very-negative", "very-positive"]
SENT_INSTR = "Please analyze the following text and rate your sentiment towards the {}. Sentiment labels include 'somewhat-positive', 'positive', 'very-positive', 'somewhat-negative', 'very-negative', 'neutral' and 'negative'. Respond with the sentiment label that best captures your sentiment towards the {}."

SPEC = {
    "hatexplain": (["hatespeech", "normal", "offensive"], "Please review the following text and indicate if it has the presence of hate speech or is offensive in nature. Respond 'hatespeech' if the text contains hate speech, 'offensive' if the text does not contain hate speech but is offensive and 'normal' if the text is neither offensive nor contains hate speech."),
    "measuringhatespeech": (["0", "1", "2"], "On a scale of 0-2 rate the level of hatespeech contained in the following text. Respond with '0' if the text does not contain hate speech, '1' if the text contains some hate speech, and '2' if the text contains a lot of hate speech."),
    "gabhate": (["Hateful", "Non-hateful"], HATE_BIN),
    "tweeteval": (["Hateful", "Non-hateful"], HATE_BIN),
    "unhealthyconversations": (["healthy", "unhealthy"], "Please review the following text and indicated if it is 'healthy' or 'unhealthy'. Respond 'healthy' if the text is healthy and 'unhealthy' if the text can be considered hostile, antagonistic, condescending, dismissive or an unfair generalization."),
    "wikidetox": (["Aggressive", "Normal"], "Please review the following text and indicate if it has the presence of malicious remark to a person or group. Respond 'Aggressive' if the text contains a personal attack and 'Normal' if the text does not contain a personal attack."),
    "goemotion": (["anger", "disgust", "fear", "joy", "sadness", "surprise"], "Please analyze the following text and assign one or more appropriate emotion labels. Emotion labels include happiness, sadness, anger, surprise, joy, fear, disgust. You can select one or multiple emotion labels that best capture the emotional content of the text. Respond with the emotion labels separated by a comma."),
    "studemo": (["anger", "anticipation", "arousal", "disgust", "fear", "joy", "sadness", "surprise", "trust", "valence"], "Please analyze the following text and assign one or more appropriate emotion labels. Emotion labels includejoy, trust, anticipation, surprise, fear, sadness, disgust, anger, valence, and arousal. You can select one or multiple emotion labels that best capture the emotional content of the text. Respond with the emotion labels separated by a comma."),
    "subjectivediscourse_response": (["answer", "answer_overans-sway", "cant-answer-lying", "cant-answer-sincere", "shift-correct", "shift-dodge"], "Please analyze the following text and indicate how the witness responded to the question. Respond with 'answer' if they answered the question reasonably, 'cant-answer-lying' if they could not answer and are lying, 'cant-answer-sincere' if they could not answer but are honest about it, 'shift-dodge' if they shifted the topic with the intent of dodging the question, 'answer_overans-sway' if they over answered the question with the intention of swaying or 'shift-correct' if they shifted the topic with the intention of clarifying the question."),
    "subjectivediscourse_question_sentiment": (SENT_LABELS, SENT_INSTR.format("questioners", "questioners")),
    "subjectivediscourse_response_sentiment": (SENT_LABELS, SENT_INSTR.format("witness", "witness")),
    "cockamamie": (["no", "yes"], "Please rate whether the following text is funny or not funny. Respond 'yes' if you think the text is funny and 'no' if you think the text is not funny."),
    "epic": (["Ironic", "Non-ironic"], "Irony is a figurative language device that conveys that opposite of literal meaning, profiling intentionally a secondary or extended meaning. Please review the following message and reply and indicate if it has the presence of irony. Respond 'Ironic' if the reply if you think the reply is ironic and 'Non-ironic' if you think the reply is not ironic."),
}
MULTI = {"goemotion", "studemo"}
RELEASE = {
    "hatexplain": "github.com/hate-alert/HateXplain (Data/dataset.json)",
    "measuringhatespeech": "huggingface.co/datasets/ucberkeley-dlab/measuring-hate-speech (measuring-hate-speech.parquet)",
    "gabhate": "osf.io/edua3 (GabHateCorpus_annotations.tsv)",
    "tweeteval": "github.com/paul-rottger/annotation-paradigms (0_data/annotations_g3.csv)",
    "unhealthyconversations": "github.com/conversationai/unhealthy-conversations (unhealthy_full.csv)",
    "wikidetox": "figshare.com/articles/dataset/Wikipedia_Talk_Labels_Aggression/4267550",
    "goemotion": "github.com/google-research/google-research/tree/master/goemotions (goemotions_1/2/3.csv)",
    "studemo": "github.com/ChrisIsKing/Parameter-Efficient-Personalization (data/studemo)",
    "subjectivediscourse": "github.com/elisaF/subjective_discourse (data/gold/gold_full_data.tar.gz)",
    "cockamamie": "github.com/limorigu/Cockamamie-Gobbledegook (cockamamie.json)",
    "epic": "huggingface.co/datasets/Multilingual-Perspectivist-NLU/EPIC (EPICorpus.csv)",
}


def _find(root: Path, *names: str) -> Path | None:
    for n in names:
        for cand in (root / n, root / (n + ".gz")):
            if cand.exists():
                return cand
    return None


def _req(root: Path, corpus: str, *names: str) -> list[Path]:
    found = [_find(root / corpus, n) for n in names]
    if any(f is None for f in found):
        miss = [n for n, f in zip(names, found) if f is None]
        raise MissingData(f"{corpus}: missing {', '.join(str(root / corpus / n) for n in miss)}"
                          f" (plain or .gz); the public release is at {RELEASE[corpus]}", miss)
    return found


def _task(name, users, source, partial=None) -> Task:
    labels, instr = SPEC[name]
    return Task(name, labels, instr, users, name in MULTI, partial, source)


def _check(path, n, value, allowed, what="label"):
    if value not in allowed:
        raise DataError(f"{path}: row {n}: bad {what} value {value!r} (expected one of {sorted(allowed)})")
    return allowed[value]


# --- hate speech ---------------------------------------------------------------------------------------
def hatexplain(root: Path) -> Task:
    orig = _find(root / "hatexplain", "dataset.json")
    users: Users = {}
    if orig is not None:
        for pid, post in load_json(orig).items():
            text = " ".join(post["post_tokens"])
            for a in post["annotators"]:
                put(users, a["annotator_id"], pid, text, [a["label"]], keep_first=False)
        return _task("hatexplain", users, str(orig))
    # the HF split form: train as a third party's CSV, val/test as HF JSON lines
    if _find(root / "hatexplain", "training_data.csv") is None:  # neither form: ask for the original
        _req(root, "hatexplain", "dataset.json")
    train, val, test, div = _req(root, "hatexplain", "training_data.csv", "hatexplain_validation.json",
                                 "hatexplain_test.json", "post_id_divisions.json")
    hf_label = {"0": "hatespeech", "1": "normal", "2": "offensive"}
    train_ids = load_json(div)["train"]
    for n, r in rows(train, required=["text", "labels", "annotator_ids"]):
        if n - 2 >= len(train_ids):
            raise DataError(f"{train}: row {n}: more rows than post_id_divisions.json has train ids")
        labs = [x.strip() for x in r["labels"].split(",")]
        anns = [x.strip() for x in r["annotator_ids"].split(",")]
        if len(labs) != len(anns):
            raise DataError(f"{train}: row {n}: {len(labs)} labels but {len(anns)} annotator ids")
        for a, lab in zip(anns, labs):
            put(users, a, train_ids[n - 2], r["text"], [_check(train, n, lab, hf_label)], keep_first=False)
    for path in (val, test):
        for n, post in enumerate(load_json(path, lines=True), start=1):
            text = " ".join(post["post_tokens"])
            ann = post["annotators"]
            for a, lab in zip(ann["annotator_id"], ann["label"]):
                put(users, a, post["id"], text, [_check(path, n, str(lab), hf_label)], keep_first=False)
    return _task("hatexplain", users, f"{train.parent} (HF splits)",
                 partial="HF train/validation/test split copies: 19,229 of 20,148 posts; train texts re-joined by a "
                         "third party (' .' -> '.'), train post ids taken from post_id_divisions.json order")


def measuringhatespeech(root: Path) -> Task:
    (p,) = _req(root, "measuringhatespeech", "measuring-hate-speech.parquet")
    users: Users = {}
    for n, r in parquet_rows(p, ["comment_id", "annotator_id", "text", "hatespeech"]):
        try:
            lab = str(int(r["hatespeech"]))
        except (TypeError, ValueError):
            raise DataError(f"{p}: row {n}: bad hatespeech value {r['hatespeech']!r}") from None
        put(users, r["annotator_id"], r["comment_id"], r["text"], [_check(p, n, lab, {k: k for k in "012"})], False)
    return _task("measuringhatespeech", users, str(p))


def gabhate(root: Path) -> Task:
    (p,) = _req(root, "gabhate", "GabHateCorpus_annotations.tsv")
    users: Users = {}
    for n, r in rows(p, delimiter="\t", header=False, min_cols=4):
        if n == 1:
            continue  # header; columns are used by position (ID, Annotator, Text, Hate)
        put(users, r[1], r[0], r[2], [_check(p, n, r[3], {"0": "Non-hateful", "1": "Hateful"})], keep_first=False)
    return _task("gabhate", users, str(p))


def tweeteval(root: Path) -> Task:
    (p,) = _req(root, "tweeteval", "annotations_g3.csv")
    users: Users = {}
    ok = {"Hateful": "Hateful", "Non-hateful": "Non-hateful"}
    for n, r in rows(p, required=["id", "text"]):
        ann = [c for c in r if c.startswith("label_")]
        for i, c in enumerate(ann):  # the paper's code used the column index as user id
            put(users, i, r["id"], r["text"], [_check(p, n, r[c], ok)], keep_first=False)
    return _task("tweeteval", users, str(p))


def unhealthyconversations(root: Path) -> Task:
    (p,) = _req(root, "unhealthyconversations", "unhealthy_full.csv")
    users: Users = {}
    for n, r in rows(p, required=["_unit_id", "comment", "_worker_id", "healthy"]):
        put(users, r["_worker_id"], r["_unit_id"], r["comment"],
            [_check(p, n, r["healthy"], {"1": "healthy", "0": "unhealthy"})], keep_first=True)
    return _task("unhealthyconversations", users, str(p))


def wikidetox(root: Path) -> Task:
    ann, com = _req(root, "wikidetox", "aggression_annotations.tsv", "aggression_annotated_comments.tsv")
    text = {r["rev_id"]: r["comment"] for _, r in rows(com, "\t", required=["rev_id", "comment"])}
    users: Users = {}
    for n, r in rows(ann, "\t", required=["rev_id", "worker_id", "aggression"]):
        if r["rev_id"] not in text:
            raise DataError(f"{ann}: row {n}: rev_id {r['rev_id']} has no comment in {com.name}")
        try:
            lab = str(int(float(r["aggression"])))
        except ValueError:
            raise DataError(f"{ann}: row {n}: bad aggression value {r['aggression']!r}") from None
        put(users, r["worker_id"], r["rev_id"], text[r["rev_id"]],
            [_check(ann, n, lab, {"0": "Normal", "1": "Aggressive"})], keep_first=True)
    return _task("wikidetox", users, str(ann))


# --- emotion -------------------------------------------------------------------------------------------
def goemotion(root: Path) -> Task:
    d = root / "goemotion"
    full = [_find(d, f"goemotions_{i}.csv") for i in (1, 2, 3)]
    partial = None
    if all(full):
        files = full
    else:
        head = _find(d, "goemotions_1_head_truncated.csv")
        if head is None:
            _req(root, "goemotion", "goemotions_1.csv", "goemotions_2.csv", "goemotions_3.csv")
        files = [head]
        partial = "truncated head of goemotions_1.csv only: 4,895 of 211,225 ratings (about 2.3%)"
    (emap,) = _req(root, "goemotion", "ekman_mapping.json")
    group = {fine: g for g, fines in load_json(emap).items() for fine in fines}
    users: Users = {}
    for f in files:
        for n, r in rows(f, required=["text", "id", "rater_id", "neutral"], drop_truncated_last=partial is not None):
            marked = [c for c in list(group) + ["neutral"] if r.get(c) == "1"]
            bad = [c for c in list(group) + ["neutral"] if r.get(c) not in ("0", "1")]
            if bad:
                raise DataError(f"{f}: row {n}: emotion column(s) {bad[:3]} not 0/1")
            if not marked or "neutral" in marked:
                continue  # PEFT-U drops unclear and neutral ratings
            # a set in the original (order arbitrary); sorted here so targets are reproducible
            put(users, r["rater_id"], r["id"], r["text"], sorted({group[c] for c in marked}), keep_first=True)
    return _task("goemotion", users, str(files[0].parent), partial)


def studemo(root: Path) -> Task:
    ann, txt = _req(root, "studemo", "annotation_data.csv", "text_data.csv")
    text = {r["text_id"]: r["text"] for _, r in rows(txt, required=["text_id", "text"])}
    dims = ["joy", "trust", "anticipation", "surprise", "fear", "sadness", "disgust", "anger", "valence", "arousal"]
    users: Users = {}
    for n, r in rows(ann, required=["text_id", "annotator_id"] + dims):
        if r["text_id"] not in text:
            raise DataError(f"{ann}: row {n}: text_id {r['text_id']} not in {txt.name}")
        try:
            labs = [c for c in dims if float(r[c]) >= 1]
        except ValueError:
            raise DataError(f"{ann}: row {n}: non-numeric emotion intensity") from None
        put(users, r["annotator_id"], r["text_id"], text[r["text_id"]], labs, keep_first=True)
    return _task("studemo", users, str(ann))


# --- discourse, humour, irony --------------------------------------------------------------------------
_SENT = {"somewhatNegative": "somewhat-negative", "somewhatPositive": "somewhat-positive",
         "veryNegative": "very-negative", "veryPositive": "very-positive"}


def subjectivediscourse(root: Path) -> dict[str, Task]:
    d = root / "subjectivediscourse"
    tsv = _find(d, "with_features_annotated_questions_responses_gold.tsv")
    if tsv is not None:
        from .readers import open_text
        src, f = tsv, open_text(tsv)
    else:
        (arc,) = _req(root, "subjectivediscourse", "gold_full_data.tar.gz")
        src, f = arc, tar_member(arc, "with_features_annotated_questions_responses_gold.tsv")
    import csv
    reader = csv.reader(f, delimiter="\t")
    next(reader)
    out = {k: {} for k in ("response", "question_sentiment", "response_sentiment")}
    for n, r in enumerate(reader, start=2):
        if len(r) < 22:
            raise DataError(f"{src}: row {n} has {len(r)} fields, need at least 22")
        try:
            coarse, workers, sents, qsents = (ast.literal_eval(r[i]) for i in (11, 17, 18, 21))
        except (ValueError, SyntaxError):
            raise DataError(f"{src}: row {n}: columns 11/17/18/21 are not tuple literals") from None
        if not (len(coarse) == len(workers) == len(sents) == len(qsents)):
            raise DataError(f"{src}: row {n}: label tuples and workers differ in length")
        text = " \n ".join(r[i] for i in (5, 6, 7, 8))
        for w, c, s, q in zip(workers, coarse, sents, qsents):
            put(out["response"], w, r[3], text, [c], keep_first=False)
            put(out["response_sentiment"], w, r[3], text, [_SENT.get(s, s)], keep_first=False)
            put(out["question_sentiment"], w, r[3], text, [_SENT.get(q, q)], keep_first=False)
    for t in ("response", "question_sentiment", "response_sentiment"):
        labels = set(SPEC[f"subjectivediscourse_{t}"][0])
        for u, samples in out[t].items():
            for sid, s in samples.items():
                if s["label"][0] not in labels:
                    raise DataError(f"{src}: sample {sid} worker {u}: unknown {t} label {s['label'][0]!r}")
    return {f"subjectivediscourse_{k}": _task(f"subjectivediscourse_{k}", v, str(src)) for k, v in out.items()}


def cockamamie(root: Path) -> Task:
    (p,) = _req(root, "cockamamie", "cockamamie.json")
    data = load_json(p)
    try:
        votes = data["word_ratings"]["votes"]
    except (KeyError, TypeError):
        raise DataError(f"{p}: no word_ratings.votes list") from None
    users: Users = {}
    ids: dict[str, int] = {}
    for n, entry in enumerate(votes):
        for word, v in entry.items():
            if not isinstance(v, dict) or "no_votes" not in v or "yes_votes" not in v:
                raise DataError(f"{p}: votes[{n}] {word!r}: needs no_votes and yes_votes lists")
            sid = ids.setdefault(word, len(ids))
            for lab in ("no", "yes"):  # no first, then yes: a voter in both ends up 'yes'
                for voter in v[f"{lab}_votes"]:
                    put(users, voter, sid, word, [lab], keep_first=False)
    return _task("cockamamie", users, str(p))


def epic(root: Path) -> Task:
    (p,) = _req(root, "epic", "EPICorpus.csv")
    users: Users = {}
    for n, r in rows(p, required=["id_original", "user", "parent_text", "text", "label"]):
        text = f'message: "{r["parent_text"]}"\n\nreply: "{r["text"]}"'
        put(users, r["user"], r["id_original"], text,
            [_check(p, n, r["label"], {"iro": "Ironic", "not": "Non-ironic"})], keep_first=False)
    return _task("epic", users, str(p))


LOADERS = {"hatexplain": hatexplain, "measuringhatespeech": measuringhatespeech, "gabhate": gabhate,
           "tweeteval": tweeteval, "unhealthyconversations": unhealthyconversations, "wikidetox": wikidetox,
           "goemotion": goemotion, "studemo": studemo, "cockamamie": cockamamie, "epic": epic}
