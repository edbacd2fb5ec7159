"""Put local torchvision weight files into torch.hub's cache, so ``pretrained`` works offline.

    python -m wpcrack.models.weights_cache FILE...

torchvision looks for ``<torch.hub.get_dir()>/checkpoints/<file name of the download URL>`` before
it downloads, so a copy under the same name is used as is. A file already there with the same
content is left alone; no arguments is a no-op (the Makefile passes a glob that may match nothing).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
from pathlib import Path

from wpcrack.errors import WpcrackError
from wpcrack.io import atomic_path

# torchvision's file names end in the first hex digits of the file's sha256 (torch.hub.HASH_REGEX).
_HASH_PREFIX = re.compile(r"-([a-f0-9]{8,})\.")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def cache_weights(files: list[str | Path], dest: Path | None = None) -> list[Path]:
    """Copy each file into the cache (``dest``, default torch.hub's); returns the cached paths.

    A file whose name carries a hash prefix must match it: torch.hub checks that prefix only when it
    downloads, so a corrupt copy would otherwise load silently.
    """
    if not files:
        return []
    dest = cache_dir() if dest is None else dest
    cached = []
    for item in map(Path, files):
        if not item.is_file():
            raise WpcrackError(f"{item}: weights file not found")
        digest = _sha256(item)
        match = _HASH_PREFIX.search(item.name)
        if match and not digest.startswith(match.group(1)):
            raise WpcrackError(
                f"{item}: sha256 {digest[:12]}... does not start with {match.group(1)} as its name says (corrupt copy?)"
            )
        target = dest / item.name
        if target.is_file() and target.stat().st_size == item.stat().st_size and _sha256(target) == digest:
            print(f"{target}: already cached")
        else:
            with atomic_path(target) as tmp:
                shutil.copyfile(item, tmp)
            print(f"{target}: copied from {item}")
        cached.append(target)
    return cached


def main(argv: list[str] | None = None) -> int:
    try:
        cache_weights(sys.argv[1:] if argv is None else argv)
    except WpcrackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
