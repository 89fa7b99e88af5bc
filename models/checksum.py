"""File checksums shared by training (the weights card records them) and serving (archives are checked against
them before `make serve` starts). It lives here because both layers already depend on `models` and neither may
reach into the other."""
from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks so a large archive never sits in memory at once."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
