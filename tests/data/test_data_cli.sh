#!/usr/bin/env bash
# tests/data/test_data_cli.sh - `moe data tokenizer | shards | decode` end to end: text -> tokenizer ->
# shards -> decode gives exactly the input bytes (documents joined by <|endoftext|>), for text files and
# JSON Lines, across shard boundaries and with a validation split; bad inputs are refused naming the file.
set -uo pipefail
MOE="${MOE_BIN:?}"
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" moe-data-cli-test

# documents: UTF-8 in several scripts, invalid UTF-8, NUL bytes, CRLF, a special token, an empty file
mkdir -p "$W/docs"
python3 - "$W/docs" <<'EOF'
import os, random, sys
d = sys.argv[1]
random.seed(1)
words = ["the", "tokenizer", "merges", "pairs", "of", "bytes", "naïve", "日本語", "😀", "e\u0301",
         "Привет", "it's", "we'll", "1234", "3.14", "!!", "--", "\t"]
def text(n):
    return " ".join(random.choice(words) for _ in range(n))
docs = [text(400).encode() + b"\n", b"", b"\xff\xfe invalid \xc3( utf-8 \xed\xa0\x80 and \x00 NULs\x00",
        b"windows\r\nlines\r\n", text(50).encode() + b" <|pad|> marker", "  spaces at the end   ".encode()]
docs += [text(random.randint(1, 200)).encode() for _ in range(14)]
for i, b in enumerate(docs):
    open(os.path.join(d, "doc%02d.txt" % i), "wb").write(b)
syll = ["th", "e", "an", "re", "in", "on", "at", "en", "nd", "ti", "es", "or", "te", "of", "ed", "is"]
vocab = ["".join(random.choice(syll) for _ in range(random.randint(1, 4))) for _ in range(3000)]
train = [text(1000)] + [" ".join(random.choice(vocab) for _ in range(1000)) for _ in range(20)]
open(os.path.join(d, "..", "train.txt"), "w").write("\n".join(train))
EOF
docs=("$W"/docs/doc*.txt)

# joined FILES...: the documents' bytes joined by <|endoftext|>
joined() { python3 -c 'import sys
sys.stdout.buffer.write(b"<|endoftext|>".join(open(p, "rb").read() for p in sys.argv[1:]))' "$@"; }

# 1. train a tokenizer
if "$MOE" data tokenizer --train "$W/train.txt" --vocab 600 --out "$W/tok.json" --special "<|tool|>" \
	>"$W/train.log" 2>&1 && grep -q "wrote .*tok.json: vocab 600" "$W/train.log"; then
	pass "tokenizer trained (vocab 600)"
else
	cat "$W/train.log"; fail "tokenizer training"
fi
python3 -c 'import json, sys
t = json.load(open(sys.argv[1]))
assert t["model"]["type"] == "BPE" and len(t["model"]["vocab"]) == 600
assert t["model"]["merges"] and all(isinstance(m, str) and m.count(" ") == 1 for m in t["model"]["merges"])
names = [a["content"] for a in t["added_tokens"]]
assert names == ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|tool|>"], names
assert t["pre_tokenizer"]["type"] == "ByteLevel" and t["decoder"]["type"] == "ByteLevel"' "$W/tok.json" \
	&& pass "tokenizer.json is Hugging Face byte-level BPE with the special tokens" \
	|| fail "tokenizer.json content"
ids=$("$MOE" data encode --tokenizer "$W/tok.json" --text "a<|tool|>")
[ "$ids" = "97 599" ] && pass "a --special token encodes to its id" || fail "special id: '$ids'"

# 2. text files -> shards -> decode: the exact bytes
"$MOE" data shards --tokenizer "$W/tok.json" --in "${docs[@]}" --out "$W/s1" >"$W/s1.log" 2>"$W/s1.err" \
	|| { cat "$W/s1.err"; fail "shards (text)"; }
grep -q "MB/s" "$W/s1.err" && pass "progress line on stderr" || fail "no progress line"
[ -e "$W/s1/train_00000.bin" ] && [ ! -e "$W/s1/val_00000.bin" ] && pass "one train shard, no val" \
	|| { ls "$W/s1"; fail "shard files"; }
[ "$(head -c 8 "$W/s1/train_00000.bin")" = MOESHARD ] && \
	[ "$(od -An -tu4 -j12 -N4 "$W/s1/train_00000.bin" | tr -d ' ')" = 2 ] \
	&& pass "shard header: MOESHARD, 2 bytes a token" || fail "shard header"
"$MOE" data decode --tokenizer "$W/tok.json" "$W/s1/train_00000.bin" >"$W/s1.dec"
joined "${docs[@]}" >"$W/s1.want"
cmp -s "$W/s1.dec" "$W/s1.want" && pass "decode(shards(text)) = the documents joined by <|endoftext|>" \
	|| fail "text round trip differs"

# 3. small shards: the stream continues across shard files
"$MOE" data shards --tokenizer "$W/tok.json" --in "${docs[@]}" --out "$W/s2" --shard-tokens 500 \
	>/dev/null 2>&1 || fail "shards (small)"
n=$(ls "$W"/s2/train_*.bin | wc -l)
"$MOE" data decode --tokenizer "$W/tok.json" "$W"/s2/train_*.bin >"$W/s2.dec"
[ "$n" -gt 3 ] && cmp -s "$W/s2.dec" "$W/s1.want" && pass "$n shards of 500 tokens decode to the same bytes" \
	|| fail "multi-shard round trip ($n shards)"

# 4. JSON Lines: each record's "text" is a document
python3 - "$W/in.jsonl" "$W/jsonl.want" <<'EOF'
import json, sys
texts = ["first record", "zweite Zeile: naïve café ☕", "", "tabs\tand\nnewlines\r\n", "emoji 😀👍🏽",
         "escaped \u00e9 \" quotes \\ backslash", "a <|endoftext|> inside"]
with open(sys.argv[1], "w") as f:
    for i, t in enumerate(texts):
        f.write(json.dumps({"id": i, "text": t}, ensure_ascii=(i % 2 == 0)) + "\n")
        if i == 2:
            f.write("\n")   # a blank line is skipped
open(sys.argv[2], "wb").write("<|endoftext|>".join(texts).encode())
EOF
"$MOE" data shards --tokenizer "$W/tok.json" --in "$W/in.jsonl" --out "$W/s3" >"$W/s3.log" 2>&1 \
	|| { cat "$W/s3.log"; fail "shards (jsonl)"; }
"$MOE" data decode --tokenizer "$W/tok.json" "$W/s3/train_00000.bin" >"$W/s3.dec"
cmp -s "$W/s3.dec" "$W/jsonl.want" && grep -q "7 documents" "$W/s3.log" \
	&& pass "JSON Lines: decode = the records' text joined" || fail "jsonl round trip"

# 5. validation split: per document, deterministic, every document in exactly one split, in order
"$MOE" data shards --tokenizer "$W/tok.json" --in "${docs[@]}" --out "$W/v1" --val-frac 0.4 \
	>"$W/v1.log" 2>&1 || fail "shards (val)"
"$MOE" data shards --tokenizer "$W/tok.json" --in "${docs[@]}" --out "$W/v2" --val-frac 0.4 \
	>/dev/null 2>&1 || fail "shards (val, again)"
cmp -s "$W/v1/train_00000.bin" "$W/v2/train_00000.bin" && cmp -s "$W/v1/val_00000.bin" "$W/v2/val_00000.bin" \
	&& pass "the split is deterministic" || fail "split differs between runs"
"$MOE" data decode --tokenizer "$W/tok.json" "$W/v1/train_00000.bin" >"$W/v1.train"
"$MOE" data decode --tokenizer "$W/tok.json" "$W/v1/val_00000.bin" >"$W/v1.val"
python3 - "$W/v1.train" "$W/v1.val" "${docs[@]}" <<'EOF' && pass "train + val = all documents, each once, in order" || fail "split content"
import sys
tr = open(sys.argv[1], "rb").read().split(b"<|endoftext|>")
va = open(sys.argv[2], "rb").read().split(b"<|endoftext|>")
docs = [open(p, "rb").read() for p in sys.argv[3:]]
assert len(tr) + len(va) == len(docs) and len(tr) > 0 and len(va) > 0, (len(tr), len(va))
i = j = 0
for d in docs:
    if i < len(tr) and tr[i] == d: i += 1
    elif j < len(va) and va[j] == d: j += 1
    else: raise SystemExit("document not found in order")
EOF

# 6. bad inputs are refused naming the file (and leave no shards behind)
expect_error() {	# what needle command...
	local what="$1" needle="$2"; shift 2
	if "$MOE" "$@" >"$W/err.out" 2>"$W/err.log"; then
		fail "$what: accepted"
	elif grep -qF -- "$needle" "$W/err.log"; then
		pass "$what refused: $(head -c 150 "$W/err.log" | tr '\n' ' ')"
	else
		cat "$W/err.log"; fail "$what: message lacks '$needle'"
	fi
}
expect_error "missing input" "nope.txt" data shards --tokenizer "$W/tok.json" --in "${docs[0]}" "$W/nope.txt" --out "$W/b1"
printf '{"text": "ok"}\n{"text": broken\n' >"$W/bad.jsonl"
expect_error "invalid JSON line" "bad.jsonl:2" data shards --tokenizer "$W/tok.json" --in "$W/bad.jsonl" --out "$W/b2"
[ -z "$(ls -A "$W/b2" 2>/dev/null)" ] && pass "a failed run leaves no shard" || fail "shards left after an error"
printf '{"body": "no text"}\n' >"$W/notext.jsonl"
expect_error "record without text" "notext.jsonl:1" data shards --tokenizer "$W/tok.json" --in "$W/notext.jsonl" --out "$W/b3"
printf '{"model": {"type": "WordPiece", "vocab": {}}, "pre_tokenizer": {"type": "ByteLevel"}}' >"$W/wp.json"
expect_error "WordPiece tokenizer" "wp.json: model.type" data shards --tokenizer "$W/wp.json" --in "${docs[0]}" --out "$W/b4"
printf '{"model": ' >"$W/trunc.json"
expect_error "truncated tokenizer" "trunc.json" data decode --tokenizer "$W/trunc.json" "$W/s1/train_00000.bin"
expect_error "missing tokenizer" "none.json" data shards --tokenizer "$W/none.json" --in "${docs[0]}" --out "$W/b5"
expect_error "output with shards" "$W/s1" data shards --tokenizer "$W/tok.json" --in "${docs[0]}" --out "$W/s1"
expect_error "not a shard" "doc00.txt" data decode --tokenizer "$W/tok.json" "${docs[0]}"
expect_error "missing training file" "gone.txt" data tokenizer --train "$W/gone.txt" --vocab 300 --out "$W/t2.json"
expect_error "vocab too small" "--vocab 100" data tokenizer --train "$W/train.txt" --vocab 100 --out "$W/t2.json"
[ ! -e "$W/t2.json" ] && pass "no tokenizer written by a refused run" || fail "tokenizer written after an error"

finish
