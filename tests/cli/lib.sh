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

# mpi RANKS ARGS...: $cmoe ARGS under mpirun with RANKS ranks (one BLAS
# thread each, oversubscribed as root), killed after 120 s.
mpi() {
    local ranks=$1
    shift
    timeout 120 mpirun --allow-run-as-root --oversubscribe -np "$ranks" -x OPENBLAS_NUM_THREADS=1 \
        "$cmoe" "$@"
}

# synthetic_corpus FILE: 60,000 words drawn from a fixed 8-word vocabulary, a
# sentence every 9 words; seeded, so the same bytes every time.
synthetic_corpus() {
    awk 'BEGIN { srand(11); split("and the lord said unto moses behold of", w, " ");
                for (i = 0; i < 60000; i++)
                    printf "%s%s", w[int(rand() * 8) + 1], (i % 9 == 8 ? ".\n" : " ") }' > "$1"
}
