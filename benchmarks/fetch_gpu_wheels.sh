#!/usr/bin/env bash
# Download, into .whl/, the wheels the lent GPU machine lacks (it has torch 2.11, transformers 5.17, peft,
# accelerate, pyarrow, pandas, xxhash, but not datasets, dill, multiprocess, trl or bitsandbytes), plus
# transformers 5.24 so GPU numbers use the same transformers as BENCHMARKS.md's anchor and this machine.
# bitsandbytes ships one library per CUDA version (43 MB); only the CPU and CUDA 13 ones are kept, so
# what travels stays well under the device's 64 MiB. Then carry .whl and run benchmarks/gpu_check.sh
# (or benchmarks/gpu_engines.sh, which also installs .whl/engines: DeepSpeed and its dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform any -d .whl \
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 trl==1.16.0 transformers==5.24.0 bitsandbytes==0.50.2
python3 - <<'PY'
import glob, zipfile, os
for path in glob.glob(".whl/bitsandbytes-*.whl"):
    keep = lambda name: not (name.endswith(".so") and not name.endswith(("_cpu.so", "_cuda130.so", "_cuda132.so")))
    slim = path + ".slim"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if not keep(item.filename):
                continue
            data = src.read(item.filename)
            if item.filename.endswith("/RECORD"):
                data = "\n".join(l for l in data.decode().splitlines() if keep(l.split(",")[0])).encode() + b"\n"
            dst.writestr(item, data)
    os.replace(slim, path)
PY
# For benchmarks/gpu_engines.sh, kept apart in .whl/engines so gpu_check.sh does not install them:
# DeepSpeed ships only a source package; with DS_BUILD_OPS=0 its wheel is pure Python (ops compile on
# first use; ZeRO-3 without offload needs none), so it is built here. Plus its small dependencies.
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w .whl/engines deepspeed==0.19.8
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl/engines \
    hjson py-cpuinfo einops ninja msgpack pydantic pydantic-core annotated-types typing-inspection
ls -la .whl .whl/engines
