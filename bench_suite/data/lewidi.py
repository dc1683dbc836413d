"""The four LeWiDi 2023 per-annotator datasets as extra tasks (instructions and label names are ours).

Label names are chosen so that none is a substring of another (PEFT-U's metric maps pieces by substring).
"""
from __future__ import annotations

import json
from pathlib import Path

from .core import DataError, MissingData, Task, Users, put
from .readers import load_json

LEWIDI = {
    "hs_brexit": ("HS-Brexit", {"1": "hateful", "0": "not-hateful"},
                  "Please read the following tweet about Brexit and say whether you find it hateful. Respond 'hateful' if it contains hate speech and 'not-hateful' if it does not."),
    "armis": ("ArMIS", {"1": "misogynistic", "0": "not-misogynistic"},
              "Please read the following Arabic tweet and say whether you consider it misogynistic or sexist. Respond 'misogynistic' if it is and 'not-misogynistic' if it is not."),
    "convabuse": ("ConvAbuse", {"1": "none", "0": "ambiguous", "-1": "mild", "-2": "strong", "-3": "severe"},
                  "Please read the following exchange between a conversational agent and a user and rate how abusive the user's last message is. Respond 'none' if it is not abusive, 'ambiguous' if you are unsure, and 'mild', 'strong' or 'severe' for increasing levels of abuse."),
    "md_agreement": ("MD-Agreement", {"1": "offensive", "0": "not-offensive"},
                     "Please read the following tweet and say whether you find it offensive. Respond 'offensive' if it is and 'not-offensive' if it is not."),
}
RELEASE = "github.com/Ni-Vi/lewidi_2023 (storage/data/raw) or the LeWiDi 2023 organisers' release"


def _text(ds: str, raw: str) -> str:
    if ds != "ConvAbuse":
        return raw
    conv = json.loads(raw)  # a JSON-encoded exchange: prev_agent, prev_user, agent, user
    return " ".join(f'{k.replace("_", " ")}: "{conv[k]}"' for k in ("prev_agent", "prev_user", "agent", "user")
                    if conv.get(k))


def load(name: str, root: Path) -> Task:
    ds, labels, instr = LEWIDI[name]
    users: Users = {}
    files = [root / ds / f"{ds}_{sp}.json.gz" for sp in ("train", "dev", "test")]
    files = [f if f.exists() else f.with_suffix("") for f in files]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise MissingData(f"{name}: missing {', '.join(missing)}; the public release is at {RELEASE}",
                          [Path(m).name for m in missing])
    for f in files:
        split = f.name.split("_")[-1].split(".")[0]
        for item_id, item in load_json(f).items():
            bad = [k for k in ("text", "annotations", "annotators")
                   if not isinstance(item, dict) or not isinstance(item.get(k), str)]
            if bad:
                raise DataError(f"{f}: item {item_id}: field(s) {bad} missing or not text (each item needs text, "
                                f"annotations and annotators)")
            anns, who, raw = item["annotations"].split(","), item["annotators"].split(","), item["text"]
            if len(anns) != len(who):
                raise DataError(f"{f}: item {item_id}: {len(anns)} annotations but {len(who)} annotators")
            text = _text(ds, raw)
            for a, lab in zip(who, anns):
                if lab.strip() not in labels:
                    raise DataError(f"{f}: item {item_id}: bad label value {lab!r} (expected {sorted(labels)})")
                put(users, a.strip(), f"{split}_{item_id}", text, [labels[lab.strip()]], keep_first=False)
    order = list(dict.fromkeys(labels.values()))
    return Task(name, order, instr, users, partial=None, source=str(root / ds), extra=True)
