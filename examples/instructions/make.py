"""Build the instruction-style plain-text set from examples/support (run from the repo root).

Each text is one long instruction-following document, the shape of the plain-text
prompt-tuning tutorials' data: an instruction, a numbered batch of customer messages, and
the answer for each, one JSON line per message. The loss is on every token (no target
field). Written for this project from its own messages; Apache-2.0 like the rest.

    python examples/instructions/make.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUPPORT = HERE.parent / "support"
INSTRUCTIONS = [
    "Read the customer messages below. For each one, write one line of JSON giving its "
    "topic (battery, screen, delivery, price or support) and its sentiment (positive or "
    "negative), in the order of the messages.",
    "You triage a shop's inbox. Label every message with the part of the purchase it is "
    "about and whether the customer is pleased or not. Answer with one JSON object per "
    "message, numbered like the messages.",
    "Classify the following reviews for the product team. Each answer is a JSON object "
    'with the keys "topic" and "sentiment"; topics are battery, screen, delivery, price '
    "and support, sentiments positive and negative.",
]


def messages(split: str) -> list[tuple[str, str]]:
    out = []
    for line in (SUPPORT / f"{split}.jsonl").read_text().splitlines():
        turns = json.loads(line)["messages"]
        out.append((turns[0]["content"], turns[1]["content"]))
    return out


def documents(items: list[tuple[str, str]], per_doc: int, rng: random.Random) -> list[dict]:
    rng.shuffle(items)
    docs = []
    for start in range(0, len(items) - per_doc + 1, per_doc):
        group = items[start : start + per_doc]
        text = "### Instruction\n" + rng.choice(INSTRUCTIONS) + "\n\n### Messages\n"
        text += "".join(f"{i}. {m}\n" for i, (m, _) in enumerate(group, 1))
        text += "\n### Answers\n" + "".join(f"{i}. {a}\n" for i, (_, a) in enumerate(group, 1))
        docs.append({"text": text})
    return docs


def main() -> None:
    rng = random.Random(20261125)
    train = documents(messages("train"), 3, rng)  # 53 documents
    test = documents(messages("validation") + messages("test"), 4, rng)  # 20 documents
    for name, docs in (("train", train), ("test", test)):
        (HERE / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        print(f"{name}: {len(docs)} texts")


if __name__ == "__main__":
    main()
