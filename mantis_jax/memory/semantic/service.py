"""The semantic memory service: one SemanticStore served over gRPC, in its own host-side process.

    python -m mantis_jax.memory.server --data-dir DIR --dim 256 [--index ivfpq [--ondisk]] [--port 0]
        [--tls-cert CERT.pem --tls-key KEY.pem] [--host 0.0.0.0 (needs TLS and a token)]

Requests arrive as protobuf messages (mantis_jax/memory/semantic/proto/semantic.proto), are decoded into numpy
arrays and Payloads, and go to the store, which validates them, logs writes to its fsynced log before acknowledging, and
answers searches in parallel. Every store error becomes one gRPC status with a message naming the fix; the
process keeps serving. Bound to loopback by default; bound anywhere else it refuses to start without both TLS
(--tls-cert and --tls-key: the service then speaks only TLS, on loopback too) and a token (from --token-file or
the environment variable named by --token-env), and with a token every call must send
`authorization: Bearer <token>`. The chosen port is printed ("listening on HOST:PORT") and written to
--port-file. SIGTERM/SIGINT stop the server, take a final snapshot and exit. See docs/semantic_memory.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hmac
import json
import os
import signal
import subprocess
import sys
import time

import faiss
import grpc

from mantis_jax.config import default_config
from mantis_jax.memory.semantic.errors import InvalidArgument, SemanticMemoryError
from mantis_jax.memory.semantic.index import IndexSpec
from mantis_jax.memory.semantic.proto import semantic_pb2 as pb
from mantis_jax.memory.semantic.proto import semantic_pb2_grpc as pb_grpc
from mantis_jax.memory.semantic.store import SemanticStore
from mantis_jax.memory.semantic.wire import (bytes_to_ids, ids_to_bytes, matrix_to_proto, payload_to_proto,
                                             proto_to_matrix, proto_to_payload)

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def _guard(method):
    """Turns store errors into a gRPC status; anything else is INTERNAL and the server keeps running."""

    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except SemanticMemoryError as e:
            context.abort(getattr(grpc.StatusCode, e.code), str(e))
        except Exception as e:  # a bug must not take the service down; report it to the caller
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    wrapper.__name__ = method.__name__
    return wrapper


class SemanticServicer(pb_grpc.SemanticMemoryServicer):
    def __init__(self, store: SemanticStore):
        self.store = store

    @_guard
    def Add(self, request, context):
        vectors = proto_to_matrix(request.vectors, "vectors")
        payloads = [proto_to_payload(p) for p in request.payloads]
        if any(p is None for p in payloads):
            raise InvalidArgument("every payload of Add must be present (set present=true)")
        ids = bytes_to_ids(request.ids) if request.ids else None
        return pb.AddResponse(ids=ids_to_bytes(self.store.add(vectors, payloads, ids)))

    @_guard
    def Search(self, request, context):
        f = request.filter
        result = self.store.search(
            proto_to_matrix(request.queries, "queries"), int(request.k), nprobe=request.nprobe or None,
            ef_search=request.ef_search or None, namespace=f.namespace if f.has_namespace else None,
            with_payloads=request.with_payloads)
        rows, k = result.ids.shape
        payloads = ([payload_to_proto(p) for row in result.payloads for p in row]
                    if result.payloads is not None else [])
        return pb.SearchResponse(rows=rows, k=k, ids=ids_to_bytes(result.ids),
                                 scores=result.scores.astype("<f4").tobytes(), payloads=payloads)

    @_guard
    def Remove(self, request, context):
        return pb.RemoveResponse(removed=self.store.remove(bytes_to_ids(request.ids)))

    @_guard
    def Get(self, request, context):
        vectors, payloads = self.store.get(bytes_to_ids(request.ids))
        return pb.GetResponse(vectors=matrix_to_proto(vectors), payloads=[payload_to_proto(p) for p in payloads])

    @_guard
    def Snapshot(self, request, context):
        return pb.SnapshotResponse(generation=self.store.snapshot())

    @_guard
    def Stats(self, request, context):
        return pb.StatsResponse(json=json.dumps(self.store.stats()))

    @_guard
    def Health(self, request, context):
        return pb.HealthResponse(status="SERVING")


class TokenInterceptor(grpc.ServerInterceptor):
    """Rejects every call whose `authorization` metadata is not `Bearer <token>` (constant-time compare)."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    @staticmethod
    def _deny(message: str):
        def abort(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return grpc.unary_unary_rpc_method_handler(abort)

    def intercept_service(self, continuation, handler_call_details):
        metadata = dict(handler_call_details.invocation_metadata or ())
        got = metadata.get("authorization")
        if got is None:
            return self._deny("missing token: this service requires metadata 'authorization: Bearer <token>'; "
                              "pass SemanticMemory.connect(..., token=...) or set MANTIS_SEMANTIC_TOKEN")
        if not hmac.compare_digest(got.encode(), self._expected):
            return self._deny("wrong token: the 'authorization' metadata does not match the service's token")
        return continuation(handler_call_details)


def read_token(token_file: str, token_env: str) -> str:
    if token_file:
        with open(token_file) as f:
            token = f.read().strip()
        if not token:
            raise SystemExit(f"--token-file {token_file} is empty; write the token into it")
        return token
    return os.environ.get(token_env, "").strip()


def check_exposure(host: str, token: str, tls_cert: str, tls_key: str) -> None:
    """Refuses (SystemExit naming the fix) a half-given TLS pair, and any non-loopback bind without TLS and a token:
    off loopback the token must not travel in clear text, and nobody may call without it."""
    if bool(tls_cert) != bool(tls_key):
        raise SystemExit("--tls-cert and --tls-key go together: pass both (the service's certificate and its "
                         "private key, PEM files) or neither")
    if host not in LOOPBACK and not (token and tls_cert):
        missing = " and ".join(what for what, ok in (("TLS", tls_cert), ("a token", token)) if not ok)
        raise SystemExit(f"refusing to bind {host} without {missing}: off loopback the service needs TLS "
                         "(--tls-cert CERT.pem --tls-key KEY.pem) and a token (the MANTIS_SEMANTIC_TOKEN "
                         "environment variable, or --token-env / --token-file); or bind --host 127.0.0.1")


def _server_credentials(tls_cert: str, tls_key: str) -> grpc.ServerCredentials:
    pems = []
    for flag, path in (("--tls-key", tls_key), ("--tls-cert", tls_cert)):
        try:
            with open(path, "rb") as f:
                pems.append(f.read())
        except OSError as e:
            raise SystemExit(f"{flag} {path}: {e.strerror}; pass a readable PEM file") from None
    for flag, pem in zip(("--tls-key", "--tls-cert"), pems):
        if b"-----BEGIN" not in pem:
            raise SystemExit(f"{flag}: the file holds no PEM block; pass a PEM-encoded "
                             f"{'private key' if flag == '--tls-key' else 'certificate'}")
    return grpc.ssl_server_credentials([(pems[0], pems[1])])


def build_server(store: SemanticStore, *, host: str = "127.0.0.1", port: int = 0, token: str = "",
                 tls_cert: str = "", tls_key: str = "", max_request_mb: float = 64,
                 workers: int = 8) -> tuple[grpc.Server, int]:
    """A ready (not started) gRPC server for `store`, TLS-only when given a certificate; returns (server, port)."""
    check_exposure(host, token, tls_cert, tls_key)
    options = [("grpc.max_receive_message_length", int(max_request_mb * 2 ** 20)),
               ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0)]
    interceptors = [TokenInterceptor(token)] if token else []
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=workers), options=options,
                         interceptors=interceptors)
    pb_grpc.add_SemanticMemoryServicer_to_server(SemanticServicer(store), server)
    if tls_cert:
        bound = server.add_secure_port(f"{host}:{port}", _server_credentials(tls_cert, tls_key))
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"could not bind {host}:{port}; pick another --port (0 = any free port)")
    return server, bound


def parse_args(argv: list[str]) -> argparse.Namespace:
    sem = default_config().memory.semantic
    p = argparse.ArgumentParser(prog="python -m mantis_jax.memory.server", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True, help="where the log, snapshots, vectors and payloads live")
    p.add_argument("--dim", type=int, default=sem.dim, help="vector dimension (the model's d_model)")
    p.add_argument("--index", choices=("flat", "ivfpq", "hnsw"), default=sem.index)
    p.add_argument("--metric", choices=("ip", "l2"), default=sem.metric)
    p.add_argument("--no-normalize", action="store_true", help="store vectors as given (no L2 normalisation)")
    for name in ("nlist", "pq_m", "pq_nbits", "nprobe", "hnsw_m", "ef_search", "ef_construction",
                 "refine_factor", "train_min", "train_sample", "max_k", "max_batch", "ondisk_merge_rows"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=sem[name])
    p.add_argument("--compact-ratio", type=float, default=sem.compact_ratio)
    p.add_argument("--ondisk", action="store_true", default=sem.ondisk,
                   help="ivfpq: keep the IVF inverted lists in a memory-mapped file in --data-dir, not in RAM")
    p.add_argument("--max-request-mb", type=float, default=sem.max_request_mb)
    p.add_argument("--snapshot-interval", type=float, default=sem.snapshot_interval_s, help="seconds; 0 = never")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = any free port (printed and written to --port-file)")
    p.add_argument("--port-file", default="", help="write the bound port here once serving")
    p.add_argument("--token-file", default="", help="file holding the token (else the --token-env variable)")
    p.add_argument("--token-env", default=sem.token_env)
    p.add_argument("--tls-cert", "--tls_cert", default=sem.tls_cert,
                   help="PEM certificate (chain) of the service: it then speaks only TLS; required off loopback")
    p.add_argument("--tls-key", "--tls_key", default=sem.tls_key, help="PEM private key of --tls-cert")
    p.add_argument("--workers", type=int, default=8, help="gRPC handler threads (searches run in parallel)")
    p.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads per call; 0 = FAISS default")
    return p.parse_args(argv)


def launch(data_dir: str, dim: int, *args: str, env: dict | None = None,
           timeout_s: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Starts the service as a child process on a free loopback port; returns (process, "127.0.0.1:PORT").
    `args` are extra command-line flags (e.g. "--index", "hnsw"). Used by tests and benchmarks."""
    port_file = os.path.join(data_dir, "PORT")
    if os.path.exists(port_file):
        os.remove(port_file)
    cmd = [sys.executable, "-m", "mantis_jax.memory.server", "--data-dir", data_dir, "--dim", str(dim),
           "--port", "0", "--port-file", port_file, *args]
    log_path = os.path.join(data_dir, "server.log")
    with open(log_path, "ab") as log:  # a file, not a pipe: nobody drains a pipe and a full one blocks the child
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(port_file):
        if proc.poll() is not None:
            with open(log_path, errors="replace") as f:
                raise RuntimeError(f"the service exited with {proc.returncode}: {f.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the service did not start within {timeout_s} s")
        time.sleep(0.05)
    with open(port_file) as f:
        return proc, f"127.0.0.1:{int(f.read())}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    token = read_token(args.token_file, args.token_env)
    check_exposure(args.host, token, args.tls_cert, args.tls_key)  # fail before loading a possibly large index
    if args.tls_cert:
        _server_credentials(args.tls_cert, args.tls_key)
    if args.threads > 0:
        faiss.omp_set_num_threads(args.threads)
    try:
        spec = IndexSpec(dim=args.dim, kind=args.index, metric=args.metric, normalize=not args.no_normalize,
                         nlist=args.nlist, pq_m=args.pq_m, pq_nbits=args.pq_nbits, nprobe=args.nprobe,
                         hnsw_m=args.hnsw_m, ef_search=args.ef_search, ef_construction=args.ef_construction,
                         refine_factor=args.refine_factor, train_min=args.train_min, train_sample=args.train_sample,
                         compact_ratio=args.compact_ratio, ondisk=args.ondisk,
                         ondisk_merge_rows=args.ondisk_merge_rows)
        store = SemanticStore(spec, args.data_dir, max_k=args.max_k, max_batch=args.max_batch,
                              snapshot_interval_s=args.snapshot_interval)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    server, port = build_server(store, host=args.host, port=args.port, token=token, tls_cert=args.tls_cert,
                                tls_key=args.tls_key, max_request_mb=args.max_request_mb, workers=args.workers)
    server.start()
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(port))
        os.replace(tmp, args.port_file)
    lists = ", lists on disk" if spec.ondisk else ""
    tls = ", TLS" if args.tls_cert else ""
    print(f"listening on {args.host}:{port} ({spec.kind}{lists}, dim {spec.dim}, {store.stats()['count']} "
          f"entries{tls})", flush=True)
    # The handler only appends to a list: taking a lock there (Event.set) can deadlock when the signal lands while
    # the main thread itself holds that lock, and the server then never stops.
    stop_requested: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stop_requested.append(signum))
    while not stop_requested:
        time.sleep(0.1)
    server.stop(grace=5).wait()
    store.snapshot()
    store.close()


if __name__ == "__main__":
    main()
