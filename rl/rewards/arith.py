#!/usr/bin/env python3
"""rl/rewards/arith.py - the reward program of the arithmetic task (`moe data task arith`).

Protocol (SPEC 4).  `moe grpo` starts the program once (grpo.reward_cmd, an argv list run without a
shell) and keeps it running.  For each completion it writes one JSON object on a line to our stdin:

    {"id": 17, "prompt": "37+58=", "completion": "95", "answer": "95"}

(the prompt's record from prompts.jsonl with "id" and "completion" added; the runner has already
stripped the end-of-text token), and reads one line back from our stdout, flushed at once:

    {"id": 17, "reward": 1.0}

Reward: the completion up to its first newline, surrounding whitespace stripped, is compared with
"answer": equal -> 1.0; otherwise a well-formed integer (an optional '-', then the digits 0-9) -> 0.1
(the format is right); anything else -> 0.0.

A request that is not a JSON object, or lacks "id", a "completion" string or an "answer" (a string or
an integer), is a protocol error: a message naming the line goes to stderr and the program exits with
status 2, which the runner reports with the offending record.  Blank lines are ignored.

Writing your own: read stdin line by line, answer every request with its "id" and a finite number,
in order, one line each, and flush after each line (a reply left in a buffer looks like a hang and
ends in grpo.reward_timeout_s).  Print diagnostics on stderr only.  Any other field of the prompt
records (a test list, a reference solution...) arrives untouched in the request.
"""
import json
import re
import sys

INTEGER = re.compile(r"-?[0-9]+")


def reward(completion, answer):
    """1.0 for the exact answer, 0.1 for another well-formed integer, 0.0 otherwise."""
    text = completion.split("\n", 1)[0].strip()
    if text == answer:
        return 1.0
    if INTEGER.fullmatch(text):
        return 0.1
    return 0.0


def fail(lineno, line, why):
    shown = line if len(line) <= 200 else line[:200] + "..."
    sys.stderr.write("arith.py: request line %d: %s: %s\n" % (lineno, why, shown))
    sys.stderr.flush()
    sys.exit(2)


def parse(lineno, raw):
    """The request's (id, completion, answer); exits with status 2 on a malformed one."""
    line = raw.decode("utf-8", "replace").rstrip("\r\n")
    try:
        req = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        fail(lineno, line, "not valid JSON (%s)" % e)
    if not isinstance(req, dict):
        fail(lineno, line, "not a JSON object")
    for key in ("id", "completion", "answer"):
        if key not in req:
            fail(lineno, line, 'no "%s" in the request' % key)
    if not isinstance(req["completion"], str):
        fail(lineno, line, '"completion" is not a string')
    answer = req["answer"]
    if isinstance(answer, int) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        fail(lineno, line, '"answer" is not a string or an integer')
    return req["id"], req["completion"], answer.strip()


def main():
    stdin, stdout = sys.stdin.buffer, sys.stdout
    lineno = 0
    while True:
        raw = stdin.readline()
        if not raw:
            return 0
        lineno += 1
        if not raw.strip():
            continue
        rid, completion, answer = parse(lineno, raw)
        stdout.write(json.dumps({"id": rid, "reward": reward(completion, answer)}) + "\n")
        stdout.flush()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
