#!/bin/sh
# Runs a command for cron and prints what it printed only on trouble, so cron
# mails only then:
# - silent on exit 0 (all done) and 75 (another run holds the output folder:
#   this one is skipped);
# - on exit 65 (some images failed), silent when each "batchsr: failed:" line
#   was printed at the previous run of the same command too (a run that ended
#   otherwise, 75 aside, makes them all news again): a file that stays
#   broken is mailed about once, not at every tick (the failures are kept in
#   ${XDG_STATE_HOME:-$HOME/.local/state}/batchsr/); the memory figures of a
#   run.memory_mb refusal (its size and what it counted), which move with what
#   the process holds, are left out of the comparison; everything when a failure is new, or when there is
#   none (an error of another kind);
# - everything on any other exit.
# The exit status is the command's, 75 aside (0).
# Usage: cron-run.sh /opt/batchsr/.venv/bin/batchsr run /srv/in /srv/out --progress log
out=$("$@" 2>&1)
rc=$?
# Without HOME nor XDG_STATE_HOME nothing is kept (a fixed path in /tmp could be another user's): all is
# printed, and so is why (also when the folder cannot be made or written).
state=${XDG_STATE_HOME:-${HOME:+$HOME/.local/state}}
state=${state:+$state/batchsr}
seen=${state:+$state/cron-failures-$(printf '%s\n' "$@" | cksum | cut -d ' ' -f 1)}
case $rc in
    0) [ -z "$seen" ] || rm -f "$seen"; exit 0 ;;
    75) exit 0 ;;
    65)
        failures=$(printf '%s\n' "$out" | grep '^batchsr: failed: ' |
            sed -E 's/needs about [0-9,]+ MB, above run\.memory_mb/needs about N MB, above run.memory_mb/; s/ \(counted: [^()]*\)$//' |
            LC_ALL=C sort -u)
        if [ -z "$seen" ] && [ -n "$failures" ]; then
            out="$out
cron-run.sh: neither HOME nor XDG_STATE_HOME is set: these failures cannot be kept, and are printed at every run"
            failures=
        fi
        if [ -n "$failures" ] && [ -f "$seen" ] && [ -z "$(printf '%s\n' "$failures" | LC_ALL=C comm -13 "$seen" -)" ]; then
            { printf '%s\n' "$failures" > "$seen.tmp" && mv "$seen.tmp" "$seen"; } 2>/dev/null  # the fixed dropped: a relapse is news
            exit 65
        fi
        if [ -n "$failures" ]; then
            if ! { mkdir -p "$state" && printf '%s\n' "$failures" > "$seen.tmp" && mv "$seen.tmp" "$seen"; } 2>/dev/null; then
                out="$out
cron-run.sh: cannot keep these failures in $state (create it, writable by this user, or set XDG_STATE_HOME): they are printed at every run"
            fi
        elif [ -n "$seen" ]; then
            rm -f "$seen"  # an error of another kind: the failures after it are news again
        fi
        ;;
    *) [ -z "$seen" ] || rm -f "$seen" ;;  # another trouble: the failures after it are news again
esac
printf '%s\n' "$out"
exit $rc
