#!/usr/bin/env bash
# The GPU acceptance check, for a fresh box with PyTorch but neither DeepSpeed nor a network (docs/gpu.md).
#
#   PYTHON_VERSION=3.12 bench/gpu_check.sh --download   # on a machine with a network: the wheels, into wheels/
#   bench/gpu_check.sh                                   # on the box: install from wheels/, run, print the table
#   bench/gpu_check.sh --install-only                    # only the install, into a fresh folder (no GPU needed)
#   bench/gpu_check.sh --allow-cpu                       # install and run on a CPU: a check of the check
#
# Settings (environment):
#   PYTHON          the box's Python, the one with PyTorch (default: python3)
#   WHEELS          the carried wheels (default: wheels/ in the checkout; git ignores it)
#   CHECK_ENV       the fresh folder it installs into (default: .gpu_check/ in the checkout; git ignores it)
#   PYTHON_VERSION  with --download: the box's Python version (default: this machine's python3's)
#   OUT             the table's file (default: gpu_check.md in the checkout)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
wheels="${WHEELS:-$root/wheels}"
check_env="${CHECK_ENV:-$root/.gpu_check}"
fail() { echo "gpu_check.sh: error: $*" >&2; exit 2; }

# DeepSpeed as requirements.txt pins it, and what it and the matrix's test need, at the versions tested here.
deepspeed_pin=$(grep -E '^deepspeed==' "$root/requirements.txt" | cut -d' ' -f1)
needs=(einops==0.8.2 hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 numpy==2.4.6 packaging==26.4 psutil==7.2.2
       py-cpuinfo==9.0.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
       typing_extensions==4.16.0 tqdm==4.70.1 pytest==9.2.0 pytest-timeout==2.4.0 pluggy==1.7.0 iniconfig==2.3.1
       Pygments==2.21.0 pytest-xdist==3.8.0 execnet==2.1.2
       setuptools==84.2.1)  # torch >= 2.13 needs setuptools >= 77; a fresh venv of Python 3.11 has 65

download() {
  local version="${PYTHON_VERSION:-$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')}"
  mkdir -p "$wheels"
  # PyPI has DeepSpeed's source only: this builds its pure-Python wheel (the box JIT-builds its CUDA ops).
  python3 -m pip wheel -q --no-deps -w "$wheels" "$deepspeed_pin"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$wheels" "${needs[@]}"
  echo "gpu_check.sh: $(ls "$wheels" | wc -l) wheels for Python $version in $wheels; copy them to the box with the checkout"
}

install() {
  if ! compgen -G "$wheels/deepspeed-*.whl" >/dev/null; then
    fail "no DeepSpeed wheel in $wheels: prepare the wheels on a machine with a network: PYTHON_VERSION=<the box's> bench/gpu_check.sh --download"
  fi
  "$python" -c 'import torch' 2>/dev/null || fail "$python has no PyTorch: set PYTHON to the box's Python that has it"
  # A fresh folder that sees the box's packages (its torch above all) and holds what the box lacks.
  rm -rf "$check_env"
  "$python" -m venv "$check_env"
  "$python" -c 'import site, sysconfig; print("\n".join(dict.fromkeys(
      [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()])))' \
    > "$("$check_env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/box_packages.pth"
  "$check_env/bin/python" -m pip install -q --no-index --find-links "$wheels" "$deepspeed_pin" pytest pytest-timeout pytest-xdist
  "$check_env/bin/python" -m pip list --format=freeze --path \
    "$("$check_env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > "$check_env/installed.txt"
  "$check_env/bin/python" -c 'import deepspeed, torch; print(f"gpu_check.sh: DeepSpeed {deepspeed.__version__} on torch {torch.__version__}")'
  echo "gpu_check.sh: installed from $wheels into $check_env: $(grep -v '^pip==' "$check_env/installed.txt" | tr '\n' ' ')"
}

run_checks() {
  PATH="$check_env/bin:$PATH" "$check_env/bin/python" "$root/bench/gpu_check.py" \
    --out "${OUT:-$root/gpu_check.md}" --installed "$check_env/installed.txt" "$@"
}

case "${1:-}" in
  --download) download ;;
  --install-only) install ;;
  "")
    reason=$("$python" -c 'import torch
if not torch.cuda.is_available():
    try:
        torch.cuda.init()
    except Exception as e:
        print(str(e).split(". ")[0])
    else:
        print("it finds no GPU")' 2>/dev/null) || reason="$python has no PyTorch"
    if [[ -n "$reason" ]]; then fail "no GPU that torch can use here ($reason): this check is for a GPU box (docs/gpu.md)"; fi
    install
    run_checks ;;
  --allow-cpu)
    install
    run_checks --allow-cpu ;;
  *) fail "unknown argument '$1': give --download, --install-only, --allow-cpu or nothing" ;;
esac
