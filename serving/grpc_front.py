"""The gRPC inference port clients use, in front of TorchServe's own: every call passed through, StreamPredictions2
refused.

TorchServe 0.12's frontend completes a StreamPredictions2 response stream as soon as the client half-closes; when
the worker's answer arrives, `GRPCJob.response` checks only `isCancelled()` before `onNext` and throws, and
`WorkerThread` handles that IllegalStateException by dropping its worker's connection without a retry: the
version stays READY in describe and never answers again, and only a restart of java revives it (SECURITY.md).
TorchServe has no setting to refuse one method, and these models are stateless (StreamPredictions2 exists for
sequence batching), so this front answers it UNIMPLEMENTED, before anything reaches TorchServe, and passes every
other call (TorchServe's Ping, Predictions and StreamPredictions, the Open Inference Protocol's methods) through
byte for byte, with its metadata (the prod profile's `authorization`) and its deadline, to TorchServe's own gRPC
inference port. `serving/server.py` starts and stops it with java when the config names `grpc_front_port`.

    python -m serving.grpc_front --listen 127.0.0.1:7070 --upstream 127.0.0.1:7072 \\
        [--certificate server.crt --private-key server.key] [--max-message-bytes 1048576] [--pid-file F]
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc

INFERENCE = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/"
REFUSED = INFERENCE + "StreamPredictions2"
SERVER_STREAMING = frozenset({INFERENCE + "StreamPredictions"})  # every other method of the port is unary
REFUSAL = ("StreamPredictions2 is refused on this server: TorchServe 0.12 loses the worker of a version when a "
           "client half-closes such a stream before its answer (SECURITY.md); these models are stateless, so use "
           "Predictions or StreamPredictions")
# Metadata gRPC itself sets on a call; what a client adds (authorization) is forwarded.
OWN_METADATA = ("user-agent", "grpc-")


def forwarded(context: grpc.ServicerContext) -> list[tuple[str, str | bytes]]:
    return [(key, value) for key, value in context.invocation_metadata() if not key.startswith(OWN_METADATA)]


class Front(grpc.GenericRpcHandler):
    """Requests and answers stay serialized bytes: the front needs no protos and cannot alter a message."""

    def __init__(self, upstream: grpc.Channel) -> None:
        self.upstream = upstream

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method
        if method == REFUSED:
            return grpc.stream_stream_rpc_method_handler(self.refuse)
        if method in SERVER_STREAMING:
            return grpc.unary_stream_rpc_method_handler(self.streamed(method))
        return grpc.unary_unary_rpc_method_handler(self.unary(method))

    @staticmethod
    def refuse(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, REFUSAL)
        yield from ()  # a generator, as a stream handler must be; abort raises before this

    def unary(self, method: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        call = self.upstream.unary_unary(method)

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                return call(request, metadata=forwarded(context), timeout=context.time_remaining())
            except grpc.RpcError as error:
                context.abort(error.code(), error.details() or "")

        return handle

    def streamed(self, method: str) -> Callable[[bytes, grpc.ServicerContext], Iterator[bytes]]:
        call = self.upstream.unary_stream(method)

        def handle(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            answers = call(request, metadata=forwarded(context), timeout=context.time_remaining())
            context.add_callback(answers.cancel)  # the client went away: stop waiting upstream too
            try:
                yield from answers
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.CANCELLED:
                    context.abort(error.code(), error.details() or "")

        return handle


def build(listen: str, upstream: str, certificate: Path | None, private_key: Path | None,
          max_message_bytes: int) -> tuple[grpc.Server, grpc.Channel]:
    """The front, bound to `listen` (raises if it cannot bind) but not started; TLS on both sides when a
    certificate is given (TorchServe's gRPC then speaks TLS with the same pair, `enable_grpc_ssl`)."""
    sizes = [("grpc.max_receive_message_length", max_message_bytes),
             ("grpc.max_send_message_length", max_message_bytes)]
    if certificate and private_key:
        pem = certificate.read_bytes()
        channel = grpc.secure_channel(upstream, grpc.ssl_channel_credentials(root_certificates=pem), options=sizes)
    else:
        channel = grpc.insecure_channel(upstream, options=sizes)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), handlers=[Front(channel)], options=sizes)
    if certificate and private_key:
        bound = server.add_secure_port(listen, grpc.ssl_server_credentials([(private_key.read_bytes(), pem)]))
    else:
        bound = server.add_insecure_port(listen)
    if not bound:  # older grpcio returns 0 instead of raising
        raise RuntimeError(f"cannot listen on {listen}")
    return server, channel


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", required=True, help="host:port clients call")
    p.add_argument("--upstream", required=True, help="TorchServe's own gRPC inference address, host:port")
    p.add_argument("--certificate", type=Path)
    p.add_argument("--private-key", type=Path)
    p.add_argument("--max-message-bytes", type=int, default=6553500, help="TorchServe's max_request_size")
    p.add_argument("--pid-file", type=Path, help="written once listening, removed on exit")
    args = p.parse_args(argv)
    if bool(args.certificate) != bool(args.private_key):
        p.error("--certificate and --private-key go together")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        server, channel = build(args.listen, args.upstream, args.certificate, args.private_key,
                                args.max_message_bytes)
    except RuntimeError as exc:
        print(f"grpc_front: {exc}", file=sys.stderr)
        return 1
    server.start()
    if args.pid_file:
        args.pid_file.write_text(f"{os.getpid()}\n")
    print(f"grpc_front: {args.listen} -> {args.upstream}; StreamPredictions2 refused", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop(grace=5).wait()
        channel.close()
        if args.pid_file:
            args.pid_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
