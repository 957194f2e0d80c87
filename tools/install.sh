#!/usr/bin/env bash
# Installs blt-dist and everything it needs into ./.venv (idempotent, fast when up to date).
#
#   BLT_VENV=path        use another virtual environment (default: .venv in the repo)
#   BLT_TORCH=spec       torch requirement installed first when the venv has no torch
#                        (default torch==2.13.0, the CPU build on this machine's disk).
#                        GPU users: install your CUDA torch into the venv first, or set
#                        BLT_TORCH to the wheel/spec you want; an existing torch is kept.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${BLT_VENV:-$repo/.venv}"
torch_spec="${BLT_TORCH:-torch==2.13.0}"
stamp="$venv/.blt-dist-installed"
want="$(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$venv/bin/python" -c "import blt_dist, streaming" 2>/dev/null; then
    exit 0
fi

[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

# torch first: with a torch already present, the range in pyproject.toml is satisfied and
# pip does not reach for a (multi-GB) CUDA build on a CPU machine.
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "[install] $torch_spec"
    "${pip[@]}" "$torch_spec" "numpy<2.2"
fi
# Pin the torch that is there now, so no dependency (streaming -> torchvision -> torch) can
# swap it for another build behind the user's back.
torch_version="$("$venv/bin/python" -W ignore -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null)"
constraints="$venv/.blt-dist-constraints.txt"
echo "torch==$torch_version" > "$constraints"
echo "[install] blt-dist[dev] (editable) and its dependencies, torch held at $torch_version"
"${pip[@]}" -c "$constraints" -e "$repo[dev]"

# mosaicml-streaming depends on torchvision; PyPI's wheel does not load beside a CPU torch
# ("operator torchvision::nms does not exist"). blt-dist never uses torchvision, and
# streaming's core does not import it, so a broken torchvision is removed and
# blt_dist/_streaming_compat.py (registered by a .pth file) keeps `import streaming` working.
if "$venv/bin/python" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('torchvision') is None)" \
   && ! "$venv/bin/python" -c "import torchvision" 2>/dev/null; then
    echo "[install] removing torchvision (incompatible with this torch build; not needed)"
    "$venv/bin/python" -m pip uninstall --quiet -y torchvision
fi
site="$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
echo "import blt_dist._streaming_compat as m; m.install()" > "$site/blt_dist_streaming_compat.pth"
"$venv/bin/python" -W ignore -c "import blt_dist, streaming, deepspeed, torch; print('[install] ok: torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'streaming', streaming.__version__)"
echo "$want" > "$stamp"
