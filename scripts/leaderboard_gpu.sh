# One leaderboard command on the GPU machine (docs/leaderboard.md): bench PRESET... for at most SECONDS, then the bench
# folder without checkpoints tarred to $OUT. Carry .lbcarry/ (tokenizer, shards.tar.xz, held-out plays).
#   usage: bash scripts/leaderboard_gpu.sh SECONDS PRESET...
export PYTHONPATH=$PWD; O=${OUT:-out}; S=$1; shift
mkdir -p runs/lb && tar -C runs/lb -xJf .lbcarry/shards.tar.xz
t0=$SECONDS
timeout $S python3 -m memlm.cli.main bench --tokens 2M --seq-len 512 --batch-size 16 --data runs/lb/shards --tokenizer .lbcarry/tok --device cuda --out runs/lb/bench --eval-data .lbcarry/eval/heldout-plays.jsonl.xz --haystack .lbcarry/eval/heldout-plays.jsonl.xz --eval-tasks ppl stream probe passkey niah_single_2 niah_multikey babilong_qa1 reversal cross_session mqar --eval-lengths 1x 2x 4x 8x 16x --samples 2 --session-gaps 0 1x --mqar widths=64 pairs=8,16,32 steps=300 seq_len=256 vocab_size=4096 batch_size=32 lr=1e-3 warmup=30 --presets "$@" > $O/bench.log 2>&1
echo "bench rc=$? $((SECONDS - t0))s"
grep -E "val_loss .*tok/s|eval .*records|Error|error" $O/bench.log | tail -40 | cut -c1-200
tar -C runs/lb -czf $O/bench_part.tgz --exclude=checkpoints bench
