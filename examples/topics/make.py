"""Build the 5-way topic task from the support set the project ships.

Each support record is a customer message and a JSON answer; this keeps the message as
``message`` and the answer's topic (battery, screen, delivery, price, support) as ``topic``,
a plain classification set for ``softprompt train`` (``--choices auto`` finds the labels):

    python examples/topics/make.py   # writes train/validation/test.jsonl here
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUPPORT = HERE.parent / "support"


def records(split: str) -> list[dict]:
    out = []
    with open(SUPPORT / f"{split}.jsonl", encoding="utf-8") as fh:
        for line in fh:
            user, answer = json.loads(line)["messages"]
            out.append(
                {"message": user["content"], "topic": json.loads(answer["content"])["topic"]}
            )
    return out


def main(folder: Path = HERE) -> None:
    for split in ("train", "validation", "test"):
        rows = records(split)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (folder / f"{split}.jsonl").write_text(text, encoding="utf-8")
        print(f"{folder / split}.jsonl: {len(rows)} records")


if __name__ == "__main__":
    main()
