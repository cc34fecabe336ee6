#!/usr/bin/env python3
"""ends_with.py - an example GRPO reward program (SPEC 4); Python 3 standard library only.

moe starts this program once (grpo.reward_cmd) and keeps it running.  For each completion it writes one
JSON line to our stdin:
    {"id": 17, "prompt": "...", "completion": "...", ...every other field of the prompt's record}
and waits (grpo.reward_timeout_s) for one line on our stdout, in the same order:
    {"id": 17, "reward": 1.0}
so every answer must be flushed at once.

Reward: 1.0 when the completion ends with TEXT (argv[1], default "!"), else 0.0.
Usage: "reward_cmd": ["python3", "rl/rewards/ends_with.py", "!"]
"""
import json
import sys


def main():
    suffix = sys.argv[1] if len(sys.argv) > 1 else "!"
    for line in sys.stdin.buffer:  # bytes: UTF-8 whatever the locale
        request = json.loads(line)
        reward = 1.0 if request["completion"].endswith(suffix) else 0.0
        sys.stdout.write(json.dumps({"id": request["id"], "reward": reward}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
