#!/usr/bin/env bash
# Run HERE (not on the GPU machine) before a device session: downloads the server's Python
# packages that the GPU image lacks into .whl/ (git-ignored through .git/info/exclude), for the
# device's Python 3.12. Then pass `carry: [".whl"]` to the device run of bench/gpu.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl \
  fastapi starlette uvicorn httptools pydantic pydantic-core pydantic-settings \
  annotated-types typing-inspection python-dotenv
ls .whl
