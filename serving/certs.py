"""`make certs`: a self-signed TLS pair for the prod profile on this machine (127.0.0.1 and localhost).

    python -m serving.certs [--out certs] [--days 30]

TorchServe reads `certificate_file` / `private_key_file` (PEM) from config.prod.properties. The pair written here
is for local use and tests only: clients must be told to trust it (`curl --cacert certs/server.crt`,
`python -m client --ca-cert certs/server.crt`). In production put the certificate of your own CA (or your
ingress's) at the same two paths, or point the two properties at it.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

from serving.catalog import ROOT

CERTIFICATE, PRIVATE_KEY = "server.crt", "server.key"


def generate(out: Path, days: int = 30) -> tuple[Path, Path]:
    """Write out/server.crt and out/server.key (RSA 2048: TorchServe 0.12 offers only ECDHE-RSA ciphers)."""
    if shutil.which("openssl") is None:
        raise RuntimeError("openssl is not installed (apt-get install openssl)")
    out.mkdir(parents=True, exist_ok=True)
    certificate, key = out / CERTIFICATE, out / PRIVATE_KEY
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-sha256", "-nodes", "-days", str(days),
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(certificate)],
                   check=True, capture_output=True)
    key.chmod(0o600)
    return certificate, key


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "certs")
    p.add_argument("--days", type=int, default=30)
    args = p.parse_args(argv)
    certificate, key = generate(args.out, args.days)
    print(f"wrote {certificate} and {key} (self-signed, {args.days} days, for 127.0.0.1 and localhost)")


if __name__ == "__main__":
    main()
