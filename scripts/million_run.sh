#!/bin/bash
# The one real million-token run (docs/benchmarks.md): hkv demo on SmolLM2 with examples/million.toml,
# under /usr/bin/time -v, its RSS sampled every 20 s. Writes under $OUT (OUTDIR to change it).
# TOKENS=262144 scripts/million_run.sh runs the same at another length (a shorter check of RSS).
cd "$(dirname "$0")/.."
OUT=${OUTDIR:-/root/million}
TOKENS=${TOKENS:-1000000}
mkdir -p "$OUT"
date -u +%FT%TZ > "$OUT"/start.txt
/usr/bin/time -v hkv demo --tokens "$TOKENS" --config examples/million.toml --store "$OUT"/store \
    --json "$OUT"/demo.json > "$OUT"/stdout.txt 2> "$OUT"/stderr.txt &
TPID=$!
sleep 5
PID=$(pgrep -f "hkv demo --tokens $TOKENS" | grep -v "^$TPID$" | tail -1)
echo "$PID" > "$OUT"/pid
while kill -0 $TPID 2>/dev/null; do
  echo "$(date +%s) $(grep -E '^(VmRSS|RssAnon|RssFile|VmHWM)' /proc/$PID/status 2>/dev/null | awk '{printf "%s %s ", $1, $2}') $(du -sb "$OUT"/store 2>/dev/null | cut -f1)" >> "$OUT"/rss.log
  sleep 20
done
wait $TPID; echo "rc $?" >> "$OUT"/rss.log
date -u +%FT%TZ > "$OUT"/end.txt
