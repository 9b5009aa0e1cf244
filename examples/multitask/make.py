"""Build the multi-task example from the two single-task sets the project ships.

Each record names its task and carries an input already in that task's template, so one
run can train a prompt for each (``softprompt train --task-field task``):

    python examples/multitask/make.py   # writes train/validation/test.jsonl here
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent
TASKS = {  # task -> (folder, input field, target field, template)
    "sentiment": ("sentiment", "review", "label", "Review: {}\nSentiment:"),
    "antonyms": ("antonyms", "word", "opposite", "Word: {}\nOpposite:"),
}


def records(split: str) -> list[dict]:
    out = []
    for task, (folder, field_in, field_out, template) in TASKS.items():
        with open(EXAMPLES / folder / f"{split}.jsonl", encoding="utf-8") as fh:
            for line in fh:
                r = json.loads(line)
                out.append(
                    {"task": task, "input": template.format(r[field_in]), "target": r[field_out]}
                )
    return out


def main(folder: Path = HERE) -> None:
    for split in ("train", "validation", "test"):
        rows = records(split)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (folder / f"{split}.jsonl").write_text(text, encoding="utf-8")
        print(f"{folder / split}.jsonl: {len(rows)} records")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
