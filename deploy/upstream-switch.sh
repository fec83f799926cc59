# Sourced by deploy/install-relay: switching a relay from upstream's chatmail-metadata to
# ours (--from-upstream) and back (--rollback).  Nothing upstream wrote is deleted: what
# ours replaces or consumes is renamed to <path>.upstream-<UTC time>, and the state file
# records each rename and the switch time, so --rollback can put everything back and knows
# which tokens were stored since.  Paths in the state file are the host's (no --root).
state=/var/lib/chatmail-metadata/upstream-switch
service=$units/chatmail-metadata.service

state_get() { sed -n "s/^$1=//p" "$root$state"; }

# Upstream's unit: its ExecStart names the socket and the ini; ours runs from our venv.
detect_upstream() {
  local unit=$root$service line
  [ -f "$unit" ] || die "no upstream chatmail-metadata found ($service does not exist)"
  if grep -q '/usr/local/lib/chatmail-metadata/venv/' "$unit"; then
    die "$service is already this project's (no upstream unit to switch from)"
  fi
  line=$(grep -m1 '^ExecStart=' "$unit") || die "$service has no ExecStart line"
  read -r _ up_socket up_ini _ <<<"${line#ExecStart=}"
  [ -n "$up_ini" ] || die "$service: ExecStart does not name a socket and an ini"
  # Dovecot connects where its mail_attribute_dict says: that path must stay.
  local conf=$root/etc/dovecot/dovecot.conf dict=""
  if [ -z "$root" ]; then
    dict=$(${DOVECONF:-doveconf} -h mail_attribute_dict 2>/dev/null || true)
  elif [ -f "$conf" ]; then
    dict=$(sed -n 's/^[[:space:]]*mail_attribute_dict[[:space:]]*=[[:space:]]*//p' "$conf" | head -1)
  fi
  dovecot_socket=$(tr ':' '\n' <<<"${dict#proxy:}" | grep -m1 '^/' || true)
  socket=${dovecot_socket:-$up_socket}
  if [ -n "$dovecot_socket" ] && [ "$dovecot_socket" != "$up_socket" ]; then
    echo "note: upstream's unit listens on $up_socket, Dovecot connects to $dovecot_socket:" \
      "using Dovecot's" >&2
  fi
  ini_host=$up_ini
  ini=$root$up_ini
  [ -f "$ini" ] || die "upstream's ini $up_ini (from $service) does not exist"
  # mailboxes_dir and the database, as our program reads them from the ini
  local paths
  paths=$("$py" - "$ini" <<'EOF'
import sys
from chatmaild.config import ConfigError, read_config
try:
    config = read_config(sys.argv[1])
except ConfigError as exc:
    sys.exit(f"install-relay: {exc}")
print(config.mailboxes_dir)
print(config.database_path)
EOF
  ) || exit 1
  mailboxes=$(sed -n 1p <<<"$paths")
  database=$(sed -n 2p <<<"$paths")
  [ -d "$root$mailboxes" ] || die "upstream's mailboxes_dir $mailboxes does not exist"
}

# What ours replaces (renamed aside) and what it consumes (the queue, imported then aside).
replaced_paths() {
  local p
  for p in "$service" "$units/chatmail-metadata.socket" "$service.d" "$lua" \
    /etc/dovecot/conf.d/90-chatmail-metadata.conf; do
    [ -e "$root$p" ] && echo "$p"
  done
  return 0
}

run_import() {  # $@: extra importer options
  "$py" -m chatmaild.importer "$ini" --root "${root:-/}" --pending "$@"
}

# Ours in place: our unit installed (and, with systemctl, its socket active).
ours_installed() {
  grep -qs '/usr/local/lib/chatmail-metadata/venv/' "$root$service" || return 1
  ((!systemctl)) || systemctl is-active --quiet chatmail-metadata.socket
}

# A rerun after a switch that failed part way: once upstream's files are all aside
# (the state says so) ours can be installed over them; before, finishing could overwrite
# one that was never moved aside, so only --rollback may go on.
plan_resume() {
  grep -q '^aside_done=' "$root$state" ||
    die "the switch-over of $(state_get switched_utc) stopped while moving upstream's files aside" \
      "(state file $state): run deploy/install-relay --rollback${root:+ --root $root}"
  socket=$(state_get socket)
  ini_host=$(state_get ini)
  ini=$root$ini_host
  mailboxes=$(state_get mailboxes)
  resume=1
  say "the switch-over of $(state_get switched_utc) was not finished (ours not installed):" \
    "finishing it (state file $state)"
  if ((dry_run)); then
    say "would install ours on socket $socket and start it"
    say "dry run: nothing changed"
    exit 0
  fi
}

plan_switch() {
  resume=0
  if [ -f "$root$state" ]; then
    if ! ours_installed; then
      plan_resume
      return 0
    fi
    say "already switched over from upstream at $(state_get switched_utc) (state file $state):" \
      "nothing to do"
    exit 0
  fi
  detect_upstream
  say "upstream chatmail-metadata: $service (socket $socket, ini $up_ini)"
  if ((dry_run)); then
    say "would stop upstream's chatmail-metadata.service"
    say "would import tokens and queued pushes from $mailboxes into $database:"
    run_import --dry-run
    local p
    while read -r p; do
      [ -n "$p" ] && say "would move $p aside to $p.upstream-<UTC time>"
    done < <(replaced_paths; [ -d "$root$mailboxes/pending_notifications" ] &&
      echo "$mailboxes/pending_notifications")
    say "would install ours on socket $socket and start it"
    say "dry run: nothing changed"
    exit 0
  fi
}

move_aside() {  # $1: kind (moved|consumed), $2: host path
  local aside="$2.upstream-$stamp"
  mv "$root$2" "$root$aside"
  printf '%s\t%s\t%s\n' "$1" "$2" "$aside" >>"$root$state"
  say "moved $2 aside to $aside"
}

switch_data() {
  stamp=$(date -u +%Y%m%dT%H%M%SZ)
  switched_at=$(date +%s)
  say "stopping upstream's chatmail-metadata"
  sysctl stop chatmail-metadata.service
  say "importing tokens and queued pushes from $mailboxes into $database"
  if ! import_summary=$(run_import); then
    say "import failed: starting upstream's chatmail-metadata again, nothing changed"
    sysctl start chatmail-metadata.service
    exit 1
  fi
  echo "$import_summary"
  if ((EUID == 0)); then  # created by root here; the service runs as the mailboxes' owner
    local f
    for f in "$root$database" "$root$database-wal" "$root$database-shm"; do
      [ -e "$f" ] && chown --reference="$root$mailboxes" "$f"
    done
  fi
  install -d -m 0755 "$root$(dirname "$state")"
  printf 'switched_at=%s\nswitched_utc=%s\nsocket=%s\nini=%s\nmailboxes=%s\n' \
    "$switched_at" "$stamp" "$socket" "$up_ini" "$mailboxes" >"$root$state.new"
  mv "$root$state.new" "$root$state"  # written before anything moves: rollback can undo
  local p
  while read -r p; do
    [ -n "$p" ] && move_aside moved "$p"
  done < <(replaced_paths)
  if [ -d "$root$mailboxes/pending_notifications" ]; then
    move_aside consumed "$mailboxes/pending_notifications"
  fi
  echo "aside_done=$(date +%s)" >>"$root$state"  # a rerun may finish the install from here
}

switch_summary() {
  say "switched over from upstream on socket $socket; state file $state"
  ((resume)) || sed 's/^/== /' <<<"$import_summary"
  say "roll back with: deploy/install-relay --rollback${root:+ --root $root}"
}

rollback() {
  [ -f "$root$state" ] || die "no switch-over to roll back (state file $state missing)"
  local switched_at mailboxes kind orig aside
  switched_at=$(state_get switched_at)
  socket=$(state_get socket)
  ini_host=$(state_get ini)
  ini=$root$ini_host
  mailboxes=$(state_get mailboxes)
  say "rolling back the switch-over of $(state_get switched_utc)"
  if ((dry_run)); then
    say "would stop ours, remove its units, Dovecot snippet and Lua hook"
    while IFS=$'\t' read -r kind orig aside; do
      [ "$kind" = moved ] && say "would restore $orig from $aside"
      [ "$kind" = consumed ] && say "would keep $aside (imported) and write still queued pushes to $orig"
    done < <(grep -P '^(moved|consumed)\t' "$root$state")
    say "would write tokens stored since the switch into $mailboxes/<addr>/metadata.json"
    say "would start upstream's chatmail-metadata.service"
    say "dry run: nothing changed"
    return 0
  fi
  say "stopping ours"
  sysctl disable --now chatmail-metadata.socket chatmail-metadata.service
  say "writing tokens stored since the switch into metadata.json, queued pushes for upstream"
  "$py" -m chatmaild.exporter "$ini" --root "${root:-/}" --since "$switched_at" --pending ||
    die "export failed: ours is stopped, upstream's files are not restored yet; fix and rerun --rollback"
  # Ours goes; where it replaced one of upstream's, that one is moved back over it.  A
  # rollback that stopped part way can be run again: a path whose aside is gone was
  # restored already and is left alone (removing "ours" there would delete upstream's).
  # A switch that stopped while moving upstream's files aside installed nothing of ours
  # (no aside_done, and our unit is not there: states older than aside_done have it):
  # what was not moved is upstream's, and stays.
  local p
  if grep -q '^aside_done=' "$root$state" ||
    grep -qs '/usr/local/lib/chatmail-metadata/venv/' "$root$service"; then
    for p in "$service" "$units/chatmail-metadata.socket" "$lua" \
      /etc/dovecot/conf.d/90-chatmail-metadata.conf "$service.d"; do
      awk -F'\t' -v p="$p" '$1 == "moved" && $2 == p { found = 1 } END { exit !found }' \
        "$root$state" || rm -rf "$root$p"
    done
  fi
  while IFS=$'\t' read -r _ orig aside; do
    if [ -e "$root$aside" ]; then
      rm -rf "$root$orig"
      mv -T "$root$aside" "$root$orig"
      say "restored $orig"
    else
      say "$orig: restored already ($aside is gone)"
    fi
  done < <(grep -P '^moved\t' "$root$state")
  # Not `grep | while`: under pipefail a grep that matches nothing would end the script.
  while IFS=$'\t' read -r _ orig aside; do
    say "kept $aside: its pushes were imported (still queued ones are back in $orig)"
  done < <(grep -P '^consumed\t' "$root$state")
  mv "$root$state" "$root$state.rolled-back-$(date -u +%Y%m%dT%H%M%SZ)"
  sysctl daemon-reload
  sysctl enable --now chatmail-metadata.service
  sysctl reload dovecot
  say "rolled back: upstream's chatmail-metadata serves $socket again"
}
