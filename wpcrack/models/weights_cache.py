"""Put local torchvision weight files into torch.hub's cache, so ``pretrained`` works offline.

    python -m wpcrack.models.weights_cache FILE...

torchvision looks for ``<torch.hub.get_dir()>/checkpoints/<file name of the download URL>`` before
it downloads, so a copy under the same name is used as is. A file already there with the same
content is left alone; no arguments is a no-op (the Makefile passes a glob that may match nothing).

Every file is checked before it is cached (``verify_weights``, also meant for the loader): against
the full sha256 in ``KNOWN_SHA256`` when its name is there, otherwise against the hash prefix in its
name. torch.hub checks only that prefix, and only when it downloads.
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

# Full sha256 of torchvision ImageNet weight files, by file name, where we know the file for certain:
# mobilenet_v2-b0353104.pth (MobileNet_V2_Weights.IMAGENET1K_V1) was hashed from ../shared/weights,
# whose README records the same digest and the checks done on the file. The ResNet files
# (resnet18-f37072fd.pth, resnet50-0676ba61.pth) could not be obtained here, so their full digests
# are not known for certain and they stay checked against the 8-hex prefix in their name only.
KNOWN_SHA256: dict[str, str] = {
    "mobilenet_v2-b0353104.pth": "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_weights(path: str | Path, digest: str | None = None) -> str:
    """Check a weights file against the full sha256 known for its name (``KNOWN_SHA256``), or else
    against the hash prefix in its name; a file with neither passes. Returns the file's sha256.

    Raises WpcrackError naming the file when it does not match. ``digest``: already computed.
    """
    path = Path(path)
    digest = digest or _sha256(path)
    known = KNOWN_SHA256.get(path.name)
    if known is not None and digest != known:
        raise WpcrackError(
            f"{path}: sha256 {digest[:12]}... differs from the known {path.name} ({known[:12]}...): corrupt or "
            f"a different file; replace it with a good copy (python -m wpcrack.models.weights_cache FILE)"
        )
    match = _HASH_PREFIX.search(path.name)
    if known is None and match and not digest.startswith(match.group(1)):
        raise WpcrackError(
            f"{path}: sha256 {digest[:12]}... does not start with {match.group(1)} as its name says (corrupt copy?)"
        )
    return digest


def cache_dir() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def cache_weights(files: list[str | Path], dest: Path | None = None) -> list[Path]:
    """Copy each file into the cache (``dest``, default torch.hub's); returns the cached paths.

    Each file must match its known full sha256, or the hash prefix in its name (``verify_weights``):
    torch.hub checks that prefix only when it downloads, so a corrupt copy would otherwise load silently.
    """
    if not files:
        return []
    dest = cache_dir() if dest is None else dest
    cached = []
    for item in map(Path, files):
        if not item.is_file():
            raise WpcrackError(f"{item}: weights file not found")
        digest = verify_weights(item)
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
