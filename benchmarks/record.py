"""Run a command and save its console output for the documentation, headed by what ran,
where and when, so that the site renders the figures from the file (docs/hooks/generated.py,
``<!-- generated: output FILE -->`` for markdown output, ``console`` for plain text)
instead of anyone typing them.

    python benchmarks/record.py docs/runs/bench-eval.txt -- python benchmarks/bench_eval.py
    python benchmarks/record.py docs/runs/demo.txt -- make demo

The first line of the file is ``# DATE, MACHINE, load average L at the start: `COMMAND` ``;
the rest is the command's standard output (and standard error, interleaved, with
``--stderr``) as it printed it (only its last N lines with ``--tail N``), also echoed while
it runs. A command that fails leaves no file (its output is still shown), so a broken run
cannot replace a good record.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from tables import run_facts  # benchmarks/tables.py (the script's own folder is on the path)


def header(command: str) -> str:
    facts = run_facts()
    bits = [facts["date"], facts["machine"]]
    if facts["load_average"] is not None:
        bits.append(f"load average {facts['load_average']:.1f} at the start")
    return "# " + ", ".join(bits) + f": `{command}`"


def record(
    path: Path,
    command: list[str],
    stderr: bool = False,
    label: str | None = None,
    tail: int | None = None,
) -> int:
    head = header(label or shlex.join(command))
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if stderr else None,
        text=True,
        bufsize=1,
    )
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line)
    code = proc.wait()
    if code != 0:
        print(f"record: {shlex.join(command)} failed ({code}); {path} not written", file=sys.stderr)
        return code
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = lines[-tail:] if tail else lines
    if len(kept) < len(lines):
        head += f" (its last {len(kept)} of {len(lines)} lines)"
    path.write_text(head + "\n" + "".join(kept), encoding="utf-8")
    print(f"record: wrote {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], usage="%(prog)s OUTPUT [options] -- COMMAND ..."
    )
    parser.add_argument("output", type=Path, help="the file to write (e.g. docs/runs/NAME.txt)")
    parser.add_argument("--stderr", action="store_true", help="keep standard error too")
    parser.add_argument(
        "--label", default=None, help="the command as the header shows it (e.g. 'make demo')"
    )
    parser.add_argument(
        "--tail", type=int, default=None, help="keep only the output's last N lines (a summary)"
    )
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        parser.error("give the command after --")
    cut = argv.index("--")
    args = parser.parse_args(argv[:cut])
    return record(args.output, argv[cut + 1 :], args.stderr, args.label, args.tail)


if __name__ == "__main__":
    sys.exit(main())
