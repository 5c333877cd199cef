#!/usr/bin/env bash
# The GPU checks of the open issues as one prepared command for the lent GPU machine (no Ray there, no
# network, about 15 minutes of device time in all, 10 minutes a command). Results go to $OUT.
#
#   here, once:      bash bench/device_wheels.sh          (downloads the missing packages into .whl/)
#   on the device:   run(command="bash bench/device_check.sh gpu,rewards", carry=[".whl"], timeout_s=540)
#                    run(command="bash bench/device_check.sh study", carry=[".whl"], timeout_s=420)
#   CPU smoke test:  OUT=/tmp/out SMOKE=1 bash bench/device_check.sh gpu,rewards,study
#
# Parts (comma-separated, in this order; each one is cut at its own time limit, and what it wrote stays):
#   gpu      bench/gpu.py: SD1.5- and SDXL-shaped pipelines at full size with random weights (issue 7):
#            sampler vs the plain diffusers pipeline, DDPO update s/sample and peak memory, LoRA sync,
#            log-prob mismatch, AlignProp per K                                   -> $OUT/gpu.json
#   rewards  bench/rewards.py --full: the learned rewards at published sizes (issue 8)  -> $OUT/rewards.json
#   study    the DiffExp study on DDPO at 10 steps (issue 6) at a budget the CPU cannot afford, every
#            checkpoint judged on 400 paired images                     -> $OUT/study.tgz (tables, plots)
# Also: $OUT/card.txt (nvidia-smi and torch's view of the card) and $OUT/log.txt (everything printed).
set -uo pipefail
cd "$(dirname "$0")/.."
PARTS="${1:-gpu,rewards,study}"
OUT="${OUT:-/tmp/device-out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=python3

if [ -z "${SMOKE:-}" ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # the smoke run uses this venv
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi";
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"; } \
    | tee "$OUT/card.txt"

part() {  # part NAME SECONDS COMMAND...: run one part under its time limit, say how it ended
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@"
    local rc=$?
    echo "== $name ended: exit $rc after $((SECONDS - t0))s$([ $rc = 124 ] && echo ' (time limit: partial results)')"
}

if [ -n "${SMOKE:-}" ]; then  # the same parts at toy size on the CPU (checks the script, not the figures)
    GPU_ARGS=(--small --steps 3 --batch 4 --alignprop-ks 1)
    REWARD_ARGS=(--rewards aesthetic,imagereward --batch 4 --reps 1)
    STUDY_ARGS=(--seeds 0 --arms plain,diffexp --parallel 1 --threads 2 --set train.epochs=2 --set train.checkpoint_every=1
                --set train.samples_per_epoch=16 --set train.prompts_per_epoch=2 --set sampling.num_steps=4
                --set algorithm.minibatch_size=8 --set algorithm.gradient_accumulation=1
                --set eval.max_prompts=2 --set eval.images_per_prompt=1 --paired-images 1 --paired-prompts 4)
else
    GPU_ARGS=()
    REWARD_ARGS=(--full --batch 32 --reps 3)
    # DDPO at 10 steps as in docs/results.md ("the study on DDPO at 10 steps"), 8x the CPU study's budget
    # (80 epochs x 64 = 5,120 queries per run), 4 arms x 3 seeds, 4 runs at a time on the one GPU
    STUDY_ARGS=(--seeds 0,1,2 --parallel 4 --threads 3 --set train.epochs=80 --set train.checkpoint_every=10
                --set eval.every=80 --paired-images 4 --paired-prompts 60)
fi

IFS=, read -ra WANT <<<"$PARTS"
for p in "${WANT[@]}"; do
    case "$p" in
    gpu) part gpu "${GPU_LIMIT:-330}" $PY bench/gpu.py --out "$OUT/gpu.json" "${GPU_ARGS[@]}" ;;
    rewards) part rewards "${REWARDS_LIMIT:-150}" bash -c "$PY bench/rewards.py ${REWARD_ARGS[*]} > $OUT/rewards.json" ;;
    study)
        S=runs/device_study${SMOKE:+_smoke}
        part study "${STUDY_LIMIT:-330}" $PY bench/study.py --out "$S" --config shapes \
            --set sampling.num_steps=10 --set 'algorithm.timestep_window=[0.0,1.0]' \
            --set 'reward.terms=[{"name":"shapes_soft","options":{"rel_scale":8.0}}]' \
            --set 'eval.reward.terms=[{"name":"shapes"}]' --set eval.images_per_prompt=2 --set eval.max_prompts=30 \
            --set output.grid_every=0 --paired --paired-sets shapes_pairs,shapes_pairs_heldout "${STUDY_ARGS[@]}"
        # whatever finished, tabulated (a run cut short is left out), then packed without the checkpoints
        $PY bench/study.py --out "$S" --config shapes "${STUDY_ARGS[@]}" --analyse-only --paired >/dev/null 2>&1
        tar czf "$OUT/study.tgz" --exclude=checkpoints --exclude=paired_base --exclude='*.safetensors' "$S" \
            && ls -la "$OUT/study.tgz"
        ;;
    *) echo "unknown part '$p' (known: gpu, rewards, study)"; exit 2 ;;
    esac
done
echo "== all parts done; results in $OUT"
