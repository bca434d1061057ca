#!/usr/bin/env bash
# Segment many volumes on one machine without a scheduler: N hypseg processes
# in parallel, each clustering its own part of the inputs (--num-parts N
# --part-id i; the sorted inputs are dealt round-robin, input j to part j mod N).
#
#   bash examples/shell_loop.sh            # 4 parts, cores shared between them
#
# Ctrl-C (or SIGTERM) stops every part (they get SIGTERM: each writes its run record
# and exits with code 143), and the script exits with 130 (Ctrl-C) or 143 (SIGTERM).
# (Started with & from another script, it ignores Ctrl-C, as bash cannot trap a signal
# ignored when it starts: stop such a run with kill PID, i.e. SIGTERM.)
# Run it again after an interruption: complete volumes are skipped. The parts
# write into one output folder; centroids.json and the run manifest
# OUT/hypseg-runs.jsonl are safe to share. Each part logs to $LOGS/part-<i>.log.
# (A plain sequential loop works too: for f in data/images/*.nii.gz; do
#  hypseg cluster "$f" -m model.pt --k 4 -o seg; done — but then every file
#  loads the model and starts Python anew.)
set -uo pipefail

# Set first, so that a signal at any point stops the script: background jobs of a script
# ignore Ctrl-C, so stop() passes it on to the parts as SIGTERM, to every part started so
# far (the job table: a part forked just before the signal is in it before its pid is in
# $pids).
pids=()
interrupted=0  # the exit code of the signal that stopped the script: 130 (INT), 143 (TERM)
stop() { interrupted=$1; kill -TERM $(jobs -p) 2> /dev/null; }
trap 'stop 130' INT
trap 'stop 143' TERM

HYPSEG=${HYPSEG:-hypseg}                          # the command, e.g. "python -m hypsegcli"
# one executable (its path may hold spaces), or else words split at blanks
if [[ -x "$HYPSEG" ]]; then hypseg=("$HYPSEG"); else read -ra hypseg <<< "$HYPSEG"; fi
DATA=${HYPSEG_EXAMPLE_DATA:-data/images}
MODEL=${HYPSEG_EXAMPLE_MODEL:-model.pt}
OUT=${HYPSEG_EXAMPLE_OUT:-seg}
KS=${HYPSEG_EXAMPLE_KS:-"2 4 8"}
PATCH=${HYPSEG_EXAMPLE_PATCH_SIZE:-5}             # side of the patch embedded around each voxel
PARTS=${HYPSEG_EXAMPLE_PARTS:-4}
LOGS=${HYPSEG_EXAMPLE_LOGS:-logs}
CORES=$(nproc 2>/dev/null || echo 4)
THREADS=${HYPSEG_EXAMPLE_THREADS:-$(( CORES / PARTS > 0 ? CORES / PARTS : 1 ))}

k_args=()
for k in $KS; do k_args+=(--k "$k"); done
mkdir -p "$LOGS"

for (( i = 0; i < PARTS; i++ )); do
    if (( interrupted )); then break; fi  # stopped while starting the parts: start no more
    "${hypseg[@]}" cluster "$DATA" -m "$MODEL" "${k_args[@]}" -o "$OUT" --threads "$THREADS" \
        --patch-size "$PATCH" --num-parts "$PARTS" --part-id "$i" 2> "$LOGS/part-$i.log" &
    pids+=($!)
done

status=0
for (( i = 0; i < ${#pids[@]}; i++ )); do
    # stopped: TERM each part again, for one that was between its fork and its exec when
    # stop() sent it (it ran the script's trap instead, and went on)
    if (( interrupted )); then kill -TERM "${pids[$i]}" 2> /dev/null; fi
    wait "${pids[$i]}"
    code=$?
    if (( interrupted && code > 128 )); then  # the wait itself was interrupted: wait again
        kill -TERM "${pids[$i]}" 2> /dev/null
        wait "${pids[$i]}" 2> /dev/null
        again=$?
        if (( again != 127 )); then code=$again; fi
    fi
    if (( code != 0 )); then
        echo "part $i failed (exit $code): $(tail -n 1 "$LOGS/part-$i.log")" >&2
        if (( status != 1 )); then status=$code; fi
    fi
done
echo "segmentations in $OUT, run records in $OUT/hypseg-runs.jsonl" >&2
if (( interrupted )); then exit "$interrupted"; fi
exit "$status"
