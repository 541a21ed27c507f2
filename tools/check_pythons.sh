#!/usr/bin/env bash
# Checks the declared Python range the way a new user meets it: for each Python on this machine,
# a fresh virtual environment and a fresh clone of this repository's HEAD commit, then the
# README's quick-start test command (its install half, then its test half). Prints one line per
# Python: version, install ok/failed, pytest's summary line, seconds. Pythons outside
# `requires-python` are listed as skipped. Runs one version at a time (the installs are large).
#
#   tools/check_pythons.sh              # every python under ~/.pyenv/versions and python3.* on PATH
#   tools/check_pythons.sh PY [PY ...]  # only these interpreters
#
# Full logs go to $LOG_DIR (default: a new temporary folder, printed at the end). Exit status 1
# when a Python inside the declared range fails to install or to pass.
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
commit=$(git -C "$repo" rev-parse HEAD)
log_dir=${LOG_DIR:-$(mktemp -d -t check_pythons.XXXXXX)}
mkdir -p "$log_dir"

# The README's test command: the quick-start line that installs and then runs pytest.
line=$(grep -m1 -E '^pip install .*&& *python -m pytest' "$repo/README.md" | sed 's/ *#.*$//')
if [[ -z $line ]]; then
    echo "README.md has no 'pip install ... && python -m pytest ...' line" >&2
    exit 2
fi
install_cmd=$(sed 's/ *$//' <<<"${line%%&&*}")
test_cmd=$(sed 's/^ *//' <<<"${line#*&&}")

# The lowest declared minor version, from requires-python = ">=3.N".
min_minor=$(sed -nE 's/^requires-python *= *">= *3\.([0-9]+).*/\1/p' "$repo/pyproject.toml")

pythons=("$@")
if (( ${#pythons[@]} == 0 )); then
    shopt -s nullglob
    pythons=("$HOME"/.pyenv/versions/*/bin/python)
    for p in $(compgen -c python3. | sort -u); do
        [[ $p =~ ^python3\.[0-9]+$ ]] && pythons+=("$(command -v "$p")")
    done
fi

# One interpreter per version, oldest first.
declare -A by_version
for py in "${pythons[@]}"; do
    version=$("$py" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null) || continue
    [[ -z ${by_version[$version]:-} ]] && by_version[$version]=$py
done

failed=0
echo "commit $commit; install: $install_cmd; test: $test_cmd"
for version in $(printf '%s\n' "${!by_version[@]}" | sort -V); do
    py=${by_version[$version]}
    minor=$(cut -d. -f2 <<<"$version")
    if [[ $version != 3.* || ( -n $min_minor && $minor -lt $min_minor ) ]]; then
        printf '%-8s skipped (outside requires-python >=3.%s)\n' "$version" "$min_minor"
        continue
    fi
    work=$(mktemp -d -t "check_py$version.XXXXXX")
    log="$log_dir/python$version.log"
    start=$SECONDS
    install=failed summary="-"
    if "$py" -m venv "$work/venv" >"$log" 2>&1 &&
        git clone -q "$repo" "$work/src" >>"$log" 2>&1 &&
        git -C "$work/src" checkout -q "$commit" >>"$log" 2>&1; then
        # A clean environment: the venv's python first, nothing inherited from an outer venv.
        run() { (cd "$work/src" && env -u PYTHONPATH -u PYTHONHOME VIRTUAL_ENV="$work/venv" \
                  PATH="$work/venv/bin:$PATH" bash -c "$1") >>"$log" 2>&1; }
        echo "+ $install_cmd" >>"$log"
        if run "$install_cmd"; then
            install=ok
            echo "+ $test_cmd" >>"$log"
            run "$test_cmd"
            summary=$(grep -E '^=* *([0-9]+ (passed|failed|skipped|errors?)|no tests ran)' "$log" | tail -1 |
                      tr -d '=' | sed 's/^ *//;s/ *$//')
            [[ -z $summary ]] && summary="(no pytest summary; see log)"
        fi
    fi
    if [[ $install != ok || $summary =~ (failed|error|no\ tests|no\ pytest) ]]; then
        failed=1
    fi
    printf '%-8s install %-6s tests: %-50s %5d s\n' "$version" "$install" "$summary" $((SECONDS - start))
    rm -rf "$work"
done
echo "logs: $log_dir"
exit $failed
