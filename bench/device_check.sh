#!/usr/bin/env bash
# The GPU checks of the open issues as one prepared command for the lent GPU machine (no Ray there, no
# network, about 15 minutes of device time in all, 10 minutes a command). Results go to $OUT.
#
#   here, once:      bash bench/device_wheels.sh          (downloads the missing packages into .whl/)
#   on the device:   run(command="bash bench/device_check.sh gpu", carry=[".whl"], timeout_s=520)
#                    run(command="bash bench/device_check.sh study", carry=[".whl"], timeout_s=480)
#   On the H200 (2026-12-04) a machine started in about 35 s; the gpu part took 311 s (SD1.5 156 s, SDXL 146 s,
#   before --profile); the study trained its 6 runs in 152 s and judged 4 of them in the remaining 200 s of a
#   360 s limit, so its limit is now 420 s (STUDY_LIMIT). Issue the second call at once: a machine goes back
#   after 30 s idle.
#   Second H200 session (same day): SD1.5 with --repeats 2 and --profile overran a 220 s limit (cut in its
#   mismatch stage); GPU_PROFILE=0 GPU_REPEATS=1 took 128 s (SD1.5) + 148 s (SDXL). With both on, allow about
#   230 + 180 s. SD1.5 also times sampling.compile (GPU_COMPILE, default inductor; empty to skip), whose first
#   call compiles, guessed at 1-2 minutes: so the defaults are GPU_SD15_LIMIT=320 GPU_SDXL_LIMIT=180 and the
#   call's timeout_s=520, which leaves too little of the 15 minutes for the study part after it; for both,
#   run the gpu part with GPU_COMPILE= GPU_SD15_LIMIT=230 (timeout_s=430).
#   CPU smoke test:  OUT=/tmp/out SMOKE=1 bash bench/device_check.sh gpu,rewards,study
#   What travels is capped at 64 MiB and the tracked tree is about 64 MiB, most of it the two Shapes models;
#   no part uses shapes-base-order, so move common/assets/shapes_base_order out of the tree (and out of the
#   index: git rm -r --cached) for the call and restore it afterwards (mv back, git reset).
#
# Parts (comma-separated, in this order; each one is cut at its own time limit, and what it wrote stays):
#   gpu      bench/gpu.py, one process per family, with random weights at full size (issue 7): SD1.5 at 512 px,
#            50 steps, batch 16; SDXL at 1024 px, 30 steps, batch 4 (its preset's sampler batch; fewer steps
#            to fit the device time). Sampler vs the plain diffusers pipeline, DDPO update s/sample and peak
#            memory, LoRA sync, log-prob mismatch (AlignProp per K with --alignprop-ks; measured once, now
#            skipped)                                                   -> $OUT/gpu_sd15.json, $OUT/gpu_sdxl.json
#            and a profile of one fused sampler call beside one pipeline call   -> $OUT/profile_{sd15,sdxl}.txt
#            If SD1.5 fails other than by its time limit, the script stops there: the same fault would spoil
#            every later part, and the device time is better kept for a rerun after the fix.
#   rewards  bench/rewards.py --full: the learned rewards at published sizes (issue 8)  -> $OUT/rewards.json
#   study    the DiffExp study on DDPO at 10 steps (issue 6) at a budget the CPU cannot afford: plain and
#            diffexp (STUDY_ARMS), 3 seeds, STUDY_EPOCHS (40) x 64 samples, all 6 runs at once, every
#            checkpoint judged on 400 paired images                     -> $OUT/study.tgz (tables, plots)
#            and the checkpoints of runs left unjudged                 -> $OUT/ckpt_RUN.tgz
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
    return $rc
}

if [ -n "${SMOKE:-}" ]; then  # the same parts at toy size on the CPU (checks the script, not the figures)
    GPU_SD15=(--small --steps 3 --batch 4 --alignprop-ks 1 --compile eager)
    GPU_SDXL=(--small --steps 3 --batch 4 --alignprop-ks 1)
    REWARD_ARGS=(--rewards aesthetic,imagereward --batch 4 --reps 1)
    STUDY_ARGS=(--seeds 0 --arms plain,diffexp --parallel 1 --threads 2 --set train.epochs=2 --set train.checkpoint_every=1
                --set train.samples_per_epoch=16 --set train.prompts_per_epoch=2 --set sampling.num_steps=4
                --set algorithm.minibatch_size=8 --set algorithm.gradient_accumulation=1
                --set eval.max_prompts=2 --set eval.images_per_prompt=1 --paired-images 1 --paired-prompts 4)
else
    # AlignProp's figures were measured on the H200 (docs/architecture.md, "GPU"): not again, to leave time for
    # a second interleaved round of the SD1.5 sampler/pipeline timings and the profiles
    GPU_SD15=(--steps 50 --batch 16 --alignprop-ks "" --repeats "${GPU_REPEATS:-2}" --compile "${GPU_COMPILE-inductor}")
    GPU_SDXL=(--steps 30 --batch 4 --alignprop-ks "" --repeats 1)
    REWARD_ARGS=(--full --batch 32 --reps 3)
    # DDPO at 10 steps as in docs/results.md ("the study on DDPO at 10 steps"), 4x the CPU study's budget
    # (40 epochs x 64 = 2,560 queries per run), plain and diffexp x 3 seeds, all 6 runs at once on the GPU
    E=${STUDY_EPOCHS:-40}
    STUDY_ARGS=(--seeds 0,1,2 --arms "${STUDY_ARMS:-plain,diffexp}" --parallel 6 --threads 2 --set train.epochs=$E
                --set train.checkpoint_every=$((E / 4)) --set eval.every=$E --paired-images 4 --paired-prompts 60)
fi

IFS=, read -ra WANT <<<"$PARTS"
for p in "${WANT[@]}"; do
    case "$p" in
    gpu)
        PROF=(--profile "$OUT/profile.txt")
        [ "${GPU_PROFILE:-1}" = 0 ] && PROF=()
        part gpu_sd15 "${GPU_SD15_LIMIT:-320}" $PY bench/gpu.py --family sd15 --out "$OUT/gpu_sd15.json" \
            "${PROF[@]}" "${GPU_SD15[@]}"
        rc=$?
        if [ $rc != 0 ] && [ $rc != 124 ]; then echo "== stopping: SD1.5 failed (exit $rc)"; exit $rc; fi
        part gpu_sdxl "${GPU_SDXL_LIMIT:-180}" $PY bench/gpu.py --family sdxl --out "$OUT/gpu_sdxl.json" \
            "${PROF[@]}" "${GPU_SDXL[@]}"
        ;;
    rewards) part rewards "${REWARDS_LIMIT:-150}" bash -c "$PY bench/rewards.py ${REWARD_ARGS[*]} > $OUT/rewards.json" ;;
    study)
        S=runs/device_study${SMOKE:+_smoke}
        COMMON=(--out "$S" --config shapes --set sampling.num_steps=10 --set 'algorithm.timestep_window=[0.0,1.0]'
                --set 'reward.terms=[{"name":"shapes_soft","options":{"rel_scale":8.0}}]'
                --set 'eval.reward.terms=[{"name":"shapes"}]' --set eval.images_per_prompt=2 --set eval.max_prompts=30
                --set output.grid_every=0 --paired --paired-sets shapes_pairs,shapes_pairs_heldout "${STUDY_ARGS[@]}")
        part study "${STUDY_LIMIT:-420}" $PY bench/study.py "${COMMON[@]}"
        # whatever finished, tabulated (a run cut short is left out) under the same protocol, then packed
        # without the checkpoints
        $PY bench/study.py "${COMMON[@]}" --analyse-only >/dev/null 2>&1
        tar czf "$OUT/study.tgz" --exclude=checkpoints --exclude=paired_base --exclude='*.safetensors' "$S" \
            && ls -la "$OUT/study.tgz"
        # the checkpoints of finished runs that the time limit left unjudged, one archive a run (about 13 MB
        # for 4 checkpoints; at most 5 archives come back beside the others): unpacked over study.tgz's tree,
        # the same bench/study.py command without --analyse-only judges them on any machine
        n=0
        for r in "$S"/*/; do
            r=${r%/}
            [ -d "$r/checkpoints" ] && [ ! -f "$r/paired.json" ] || continue
            grep -q final_eval "$r/metrics.jsonl" 2>/dev/null || continue  # cut in training: rerun instead
            name=$(basename "$r")
            if [ $n -ge 5 ]; then echo "== $name's checkpoints not packed (5 archives at most)"; continue; fi
            tar czf "$OUT/ckpt_$name.tgz" "$r/checkpoints" && n=$((n + 1)) && ls -la "$OUT/ckpt_$name.tgz"
        done
        ;;
    *) echo "unknown part '$p' (known: gpu, rewards, study)"; exit 2 ;;
    esac
done
echo "== all parts done; results in $OUT"
