#!/bin/sh
# Runs a command for cron and prints what it printed only on trouble, so cron
# mails only then: silent on exit 0 (all done) and 75 (another run holds the
# output folder: this one is skipped), everything on any other exit.
# Usage: cron-run.sh /opt/batchsr/.venv/bin/batchsr run /srv/in /srv/out --progress log
out=$("$@" 2>&1)
rc=$?
case $rc in
    0 | 75) exit 0 ;;
esac
printf '%s\n' "$out"
exit $rc
