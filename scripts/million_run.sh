#!/bin/bash
# The one real million-token run (docs/benchmarks.md): hkv demo on SmolLM2 with examples/million.toml,
# under /usr/bin/time -v, its RSS sampled every SAMPLE_S (20) s. Writes under $OUT (OUTDIR to change it).
# TOKENS=262144 scripts/million_run.sh runs the same at another length (a shorter check of RSS);
# ANSWER_TOKENS=32 replies with 32 tokens (8 by default).
# CONFIG=auto runs hkv demo without --config (its budgets planned at start for this machine, as hkv tune
# plans them); the default is examples/million.toml (written by hkv tune, its header says how).
# STORE=/root/million/store OUTDIR=/root/million/resume SAMPLE_S=1 scripts/million_run.sh resumes the
# saved session instead (hkv demo resumes when the store holds it): the resume's RSS, sampled every second.
cd "$(dirname "$0")/.."
OUT=${OUTDIR:-/root/million}
TOKENS=${TOKENS:-1000000}
STORE=${STORE:-$OUT/store}
SAMPLE_S=${SAMPLE_S:-20}
ANSWER_TOKENS=${ANSWER_TOKENS:-8}  # reply tokens: more give a steadier median decode step
CONFIG=${CONFIG:-examples/million.toml}
CONFIG_ARGS=(--config "$CONFIG")
[ "$CONFIG" = auto ] && CONFIG_ARGS=()
mkdir -p "$OUT"
date -u +%FT%TZ > "$OUT"/start.txt
/usr/bin/time -v hkv demo --tokens "$TOKENS" "${CONFIG_ARGS[@]}" --store "$STORE" \
    --answer-tokens "$ANSWER_TOKENS" --json "$OUT"/demo.json > "$OUT"/stdout.txt 2> "$OUT"/stderr.txt &
TPID=$!
sleep 5
PID=$(pgrep -f "hkv demo --tokens $TOKENS" | grep -v "^$TPID$" | tail -1)
echo "$PID" > "$OUT"/pid
while kill -0 $TPID 2>/dev/null; do
  echo "$(date +%s) $(grep -E '^(VmRSS|RssAnon|RssFile|VmHWM)' /proc/$PID/status 2>/dev/null | awk '{printf "%s %s ", $1, $2}') $(du -sb "$STORE" 2>/dev/null | cut -f1)" >> "$OUT"/rss.log
  sleep "$SAMPLE_S"
done
wait $TPID; echo "rc $?" >> "$OUT"/rss.log
date -u +%FT%TZ > "$OUT"/end.txt
