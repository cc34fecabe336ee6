#!/usr/bin/env bash
# tests/gpu/test_generate_cuda.sh - `moe generate --device cuda` (the batched latent-cache decode on the GPU,
# model/cuda/decode_cuda.cu) against `--device cpu` on the same checkpoint (configs/tiny.json, freshly
# initialised): it says it decodes on the GPU, gives 4 samples of 8 tokens, the same ones on a second run
# (seeded draws), and the CPU's tokens (the same xoshiro streams; the GPU's bf16 logits may flip a token at a
# sampling boundary, and everything after it: at least 3 of the 4 samples identical) -- sampled (temperature
# 0.9; not truncated: an untrained model's logits are nearly all equal, so bf16 rounding reorders the
# top-k / top-p order wholesale; tests/gpu/test_decode_cuda.c checks the truncated sampler on equal logits)
# and greedy.  --device cuda with --weights int8 is refused by name.  Prints SKIP and passes where
# there is no CUDA device.
set -uo pipefail
MOE="${MOE_BIN:?}"
SRC="${MOE_SRC:?}"
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh" moe-generate-cuda-test
"$MOE" init --config "$SRC/configs/tiny.json" --out "$W/t.h5" >/dev/null 2>&1 || { echo "FAIL: moe init"; exit 1; }
gen() {  # DEVICE OUT [options]: the samples into $W/OUT, stderr into $W/OUT.err
	local dev=$1 out=$2
	shift 2
	timeout -k 10 600 "$MOE" generate --checkpoint "$W/t.h5" --prompt-ids 5,9,200,17,3 --max-new-tokens 8 \
		--num-samples 4 --seed 7 --device "$dev" "$@" >"$W/$out" 2>"$W/$out.err"
}
if ! gen cuda probe --temperature 0; then
	if grep -q "no CUDA device" "$W/probe.err"; then
		echo "SKIP: no CUDA device ($(head -1 "$W/probe.err"))"
		exit 0
	fi
	cat "$W/probe.err"
	echo "FAIL: the GPU run failed"
	exit 1
fi
grep -q "decoding on the GPU" "$W/probe.err" && pass "--device cuda decodes on the GPU" ||
	fail "--device cuda does not say it decodes on the GPU"
for mode in "--temperature 0.9" "--temperature 0"; do
	# shellcheck disable=SC2086
	gen cuda g1 $mode && gen cuda g2 $mode && gen cpu c $mode || { fail "generate ($mode) failed"; continue; }
	samples=$(grep -c "^=== sample" "$W/g1")
	[ "$samples" = 4 ] || fail "$mode: $samples samples, want 4"
	cmp -s "$W/g1" "$W/g2" && pass "$mode: two GPU runs give the same samples" ||
		fail "$mode: two GPU runs differ"
	same=$(paste -d'|' <(grep -v "^===" "$W/g1") <(grep -v "^===" "$W/c") | awk -F'|' '$1 == $2' | wc -l)
	[ "$same" -ge 3 ] && pass "$mode: $same of 4 samples equal the CPU's" ||
		{ fail "$mode: only $same of 4 samples equal the CPU's"; paste "$W/g1" "$W/c"; }
done
gen cuda q --weights int8 && fail "--device cuda --weights int8 was accepted" ||
	{ grep -q "int8 runs on the CPU" "$W/q.err" && pass "--device cuda --weights int8 refused by name" ||
		fail "--device cuda --weights int8: $(head -1 "$W/q.err")"; }
finish
