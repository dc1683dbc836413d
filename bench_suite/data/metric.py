"""PEFT-U's metric (SPEC.md section 5): comma pieces, suffix stripping, substring mapping, any-gold hit."""
from __future__ import annotations

_SUFFIXES = (".", "'", "ing", "ed", '"', ")")


def parse(output: str, labels: list[str]) -> list[str]:
    """Map a generated string to config labels the way the paper's code did (quirks included: an empty
    piece maps to the first label, 'Hate' to 'Hateful', 'surprised' to 'surprise')."""
    out = []
    for piece in output.split(","):
        piece = piece.strip()
        for suf in _SUFFIXES:  # each removed at most once, in this order
            if piece.endswith(suf):
                piece = piece[: -len(suf)]
        piece = next((lab for lab in labels if piece in lab), piece)
        if piece in labels:
            out.append(piece)
    return out


def correct(output: str, gold: list[str], labels: list[str]) -> bool:
    return any(p in gold for p in parse(output, labels))


def user_accuracy(outputs: list[str], golds: list[list[str]], labels: list[str]) -> float:
    if not outputs:
        raise ValueError("a user with no test samples has no accuracy")
    return sum(correct(o, g, labels) for o, g in zip(outputs, golds)) / len(outputs)


def macro_accuracy(per_user: dict[str, float]) -> float:
    """Dataset score: unweighted mean of per-user accuracies, x100."""
    return 100.0 * sum(per_user.values()) / len(per_user) if per_user else float("nan")
