# Sourced by the runs/*.sh scripts. stage NAME CMD...: run CMD, append "NAME seconds" to $OUT/times.txt.
stage() {
  local name=$1 t0=$SECONDS; shift
  "$@"
  echo "$name $((SECONDS - t0))" | tee -a "$OUT/times.txt"
}
