#!/bin/sh
# Smoke stage for scripts/testbed: /dev/kvm must open and /dev/liveupdate must exist, then
# print the pass marker TESTBED-SMOKE-OK (TESTBED-SMOKE-FAIL otherwise).
if ! { [ -c /dev/kvm ] && : </dev/kvm; }; then
    echo "TESTBED-SMOKE-FAIL: /dev/kvm does not open"
elif [ ! -c /dev/liveupdate ]; then
    echo "TESTBED-SMOKE-FAIL: /dev/liveupdate is missing (liveupdate=on?)"
else
    echo "TESTBED-SMOKE-OK: /dev/kvm and /dev/liveupdate present"
fi
reboot -f
