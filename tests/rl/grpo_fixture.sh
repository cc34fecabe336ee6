# tests/rl/grpo_fixture.sh - what the GRPO script tests share (bash; sourced after tests/lib.sh, run in $W):
#   grpo_fixture STEPS [GRPO_JSON]
# writes a byte-level tokenizer (tok.json), 8 prompts (prompts.jsonl), the reward program reward.sh and
# cfg.json: the tiny model, STEPS steps of 8 prompts x 8 completions of at most 4 tokens (micro-batch 16,
# grad_accum 4), on the CPU (train.device=cpu: the reference; the GPU test sets cuda on the command line),
# GRPO_JSON added to the grpo section (e.g. ', "epsilon_high": 0.2').
#
# reward.sh: {"id":N,"prompt":...,"completion":...,"tag":...} -> {"id":N,"reward":1 or 0}, 1 when the
# completion's last character is a digit (its closing quote is followed by ,"tag").  With an argument:
#   exit, hang, nan, inf, junk, wrongid: from its 68th request on (step 2's 4th: id 67; a step is 64) it
#     exits (after 3 answers in step 2), sleeps, answers NaN, answers 1e999 (valid JSON, not a finite
#     double), answers no JSON, answers another id;
#   a number N: exits with a message on the request of id N.
grpo_fixture() {
	local steps=$1 extra=${2:-}
	printf 'hello world 0123456789 abc\n' >text.txt
	"$MOE" data tokenizer --train text.txt --vocab 260 --out tok.json >/dev/null 2>&1 \
		|| { echo "FAIL: moe data tokenizer"; exit 1; }
	for p in hello world abc xyz foo bar baz qux; do
		printf '{"prompt": "%s", "tag": "x"}\n' "$p"
	done >prompts.jsonl
	cat >reward.sh <<'EOF'
#!/bin/sh
mode=${1:-ok}
n=0
while IFS= read -r line; do
	n=$((n + 1))
	id=${line#'{"id":'}
	id=${id%%,*}
	[ "$id" = "$mode" ] && { echo "reward.sh: failing on id $id" >&2; exit 5; }
	case "$line" in *[0-9]'","tag"'*) r=1 ;; *) r=0 ;; esac
	if [ "$n" -gt 67 ]; then
		case "$mode" in
		exit) exit 3 ;;
		hang) sleep 1000 ;;
		nan) r=NaN ;;
		inf) r=1e999 ;;
		junk) echo 'this is not JSON'; continue ;;
		wrongid) id=$((id + 1)) ;;
		esac
	fi
	printf '{"id":%s,"reward":%s}\n' "$id" "$r"
done
EOF
	chmod +x reward.sh
	cat >cfg.json <<EOF
{"model": {"vocab_size": 260},
 "train": {"steps": $steps, "micro_batch": 16, "grad_accum": 4, "lr": 3e-2, "min_lr": 0, "warmup_steps": 0,
           "schedule": "constant", "seed": 1, "device": "cpu"},
 "checkpoint": {"dir": "ck", "every": 0}, "log": {"metrics": "m.jsonl"},
 "grpo": {"prompts": "$W/prompts.jsonl", "tokenizer": "$W/tok.json", "reward_cmd": ["$W/reward.sh"],
          "group_size": 8, "prompts_per_step": 8, "max_new_tokens": 4, "beta": 0, "num_iterations": 1$extra}}
EOF
}
