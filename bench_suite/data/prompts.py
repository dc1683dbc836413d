"""Few-shot prompts as the paper's (2023) code built them (SPEC.md section 3)."""
from __future__ import annotations

import random


def build_prompts(task, samples: dict, parts: dict[str, list[str]], seed: int = 42, fix_self_demo: bool = False):
    """-> {split: [(sample id, prompt, target)]} for one user.

    Demonstrations come from the user's own train split: for each label option in sorted order, one random
    train text carrying it (random.sample), the first three kept. `random` is re-seeded per split. The
    original meant to skip a train sample as its own demonstration but compared a list with a string, so the
    check never fired; that quirk is reproduced unless fix_self_demo=True."""
    by_label: dict[str, list[str]] = {}
    for sid in parts["train"]:
        for lab in samples[sid]["label"]:
            by_label.setdefault(lab, []).append(sid)
    options = sorted(by_label)
    out = {}
    for split in ("train", "val", "test"):
        random.seed(seed)
        rows = []
        for sid in parts[split]:
            demos = []
            for lab in options:
                pool = by_label[lab]
                if fix_self_demo and split == "train":
                    pool = [x for x in pool if x != sid]
                demos += [(samples[x]["text"], lab) for x in random.sample(pool, min(1, len(pool)))]
            demos = demos[:3]
            prompt = f"{task.instruction} " + "".join(f"Text: {t} Label: {lab}. " for t, lab in demos)
            prompt += f"Text: {samples[sid]['text']} Label: "
            rows.append((sid, prompt, ", ".join(samples[sid]["label"])))
        out[split] = rows
    return out
