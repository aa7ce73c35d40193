# Shared by the tests/cli/test_*.sh scripts (sourced, not run).
#
# check STATUS NAME: counts a pass when STATUS is 0, else prints "FAIL: NAME".
# STATUS comes first so that `check $? "... $(tail out)"` takes the status of
# the command before it: bash expands words left to right, and a command
# substitution in an earlier word would reset $? to its own status.
failures=0
passes=0
check() {
    if [ "$1" -eq 0 ]; then
        passes=$((passes + 1))
    else
        echo "FAIL: $2"
        failures=$((failures + 1))
    fi
}
