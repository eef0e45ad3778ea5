# Helpers the launchers share; sourced, not run.

die() {
  echo "error: $*" >&2
  exit 1
}

# Runs a command, or with DRY_RUN set prints it exactly as it would run.
run() {
  if [[ -n ${DRY_RUN:-} ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}
