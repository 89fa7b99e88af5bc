"""Command line for the served classifiers.

    python -m client predict cat.png dog.jpg --model cifar10 [--version 2.0] [--topk 3] [--protocol v2]
    python -m client versions cifar10
    python -m client register cifar10-2.0.mar [--workers 2]
    python -m client promote cifar10 2.0
    python -m client rollback cifar10
    python -m client scale cifar10 --workers 3 [--version 2.0]
    python -m client unregister cifar10 2.0 [--quiet 2] [--drain-timeout 30] [--force]

`unregister`, and `scale` to 0 workers, first wait until nobody has sent the version a request for --quiet
seconds (2) and it has answered every request it took (none queued, none in a worker), up to --drain-timeout
seconds, and refuse if it stays busy: TorchServe drops the queued requests of a retired version unanswered.
--force skips the wait.

The prod profile speaks TLS with tokens: pass --inference-url https://127.0.0.1:8443 --management-url
https://127.0.0.1:8444 --metrics-url https://127.0.0.1:8445 --key-file logs/key_file.json --ca-cert certs/server.crt.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import requests

from client.api import DEFAULT_MANAGEMENT_URL, ServerError, TorchServeClient, numerics_choice
from serving.transport import socket_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inference-url", default="http://127.0.0.1:8080")
    p.add_argument("--management-url", default=DEFAULT_MANAGEMENT_URL,
                   help="http(s)://host:port, or unix:PATH for a Unix socket (default: make serve's, "
                        "logs/management.sock)")
    p.add_argument("--metrics-url", default="http://127.0.0.1:8082", help="where unregister/scale watch a drain")
    p.add_argument("--key-file", type=Path, help="TorchServe's key_file.json, when token authorization is on")
    p.add_argument("--ca-cert", type=Path, help="certificate to trust for https:// URLs (prod: certs/server.crt)")
    sub = p.add_subparsers(dest="command", required=True)
    predict = sub.add_parser("predict", help="top-k labels for each image")
    predict.add_argument("images", nargs="+", type=Path)
    predict.add_argument("--model", default="cifar10")
    predict.add_argument("--version")
    predict.add_argument("--topk", type=int)
    predict.add_argument("--protocol", choices=["native", "v1", "v2"], default="native",
                         help="this project's /predictions API, or KServe's v1 or v2 (Open Inference Protocol)")
    sub.add_parser("versions", help="registered versions and their workers").add_argument("model")
    register = sub.add_parser("register", help="register an archive that is in the model store")
    register.add_argument("archive")
    register.add_argument("--workers", type=int, default=1)
    promote = sub.add_parser("promote", help="make a version the default")
    promote.add_argument("model")
    promote.add_argument("version")
    sub.add_parser("rollback", help="make the previous version the default again").add_argument("model")
    scale = sub.add_parser("scale", help="set the number of workers")
    scale.add_argument("model")
    scale.add_argument("--workers", type=int, required=True)
    scale.add_argument("--version")
    unregister = sub.add_parser("unregister", help="retire a version once it has drained")
    unregister.add_argument("model")
    unregister.add_argument("version")
    for command in (scale, unregister):
        command.add_argument("--quiet", type=float, default=2.0,
                             help="seconds without a new request that count as nobody sending to the version")
        command.add_argument("--drain-timeout", type=float, default=30.0,
                             help="seconds to wait for the version to go quiet and answer before refusing")
        command.add_argument("--force", action="store_true", help="do not wait (queued requests go unanswered)")
    return p


def run(args: argparse.Namespace) -> None:
    urls = {"inference_url": args.inference_url, "management_url": args.management_url,
            "metrics_url": args.metrics_url, "ca_cert": args.ca_cert}
    client = TorchServeClient.from_key_file(args.key_file, **urls) if args.key_file else TorchServeClient(**urls)
    if args.command == "predict":
        for path in args.images:
            answer = client.predict(path, args.model, args.version, args.topk, args.protocol)
            print(f"{path}: " + ", ".join(f"{label} {p:.4f}" for label, p in answer.items()))
    elif args.command == "versions":
        for d in client.versions(args.model):
            workers = ", ".join(f"{w['pid']}:{w['status']}" for w in d.get("workers", [])) or "no workers"
            print(f"{args.model} {d['modelVersion']}{' (default)' if d['default'] else ''}: "
                  f"{d['modelUrl']}, batch {d['batchSize']}/{d['maxBatchDelay']} ms, {workers}"
                  f"{numerics_line(client, args.model, d)}")
    elif args.command == "register":
        print(client.register(args.archive, args.workers))
    elif args.command == "promote":
        print(client.promote(args.model, args.version))
    elif args.command == "rollback":
        print(f"{args.model}: default is now {client.rollback(args.model)}")
    elif args.command == "scale":
        print(client.scale(args.model, args.workers, args.version, args.force, args.drain_timeout, args.quiet))
    elif args.command == "unregister":
        print(client.unregister(args.model, args.version, args.force, args.drain_timeout, args.quiet))


def numerics_line(client: TorchServeClient, model: str, described: dict) -> str:
    """`, numerics fp32-cl (auto; fp32 154 img/s, fp32-cl 222 img/s; ...)`: what a worker chose and measured."""
    if not any(w.get("status") == "READY" for w in described.get("workers", [])):
        return ""
    handler = client.handler_description(model, described["modelVersion"]) or {}
    return f", numerics {numerics_choice(handler['numerics'])}" if handler.get("numerics") else ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except requests.ConnectionError as exc:
        url = exc.request.url if exc.request is not None else ""
        where = socket_path(url) or url.split("/")[2] if url else "the server"
        print(f"error: no answer from {where}: is TorchServe running (make serve)? ({exc})", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
