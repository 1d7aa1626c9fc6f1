"""The local servers start, answer, and leave nothing running once stopped."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, urlsplit

import pg8000.exceptions
import pg8000.native
import pytest
import redis
from redis.cluster import RedisCluster

from session_gc_local import servers
from session_gc_local.servers import (
    LOOPBACK,
    free_ports,
    local_servers,
    make_tls_files,
    start_postgres,
    start_valkey,
    start_valkey_cluster,
    start_valkey_tls,
    valkey_supports_tls,
)


def processes_mentioning(path: Path) -> list[int]:
    """Pids of live processes whose command line names `path` (zombies have an empty one)."""
    needle = str(path).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            pids.append(int(entry.name))
    return pids


def pg_connect(url: str) -> pg8000.native.Connection:
    # pg8000 takes no URL; pgserver's has the socket directory in its `host` parameter.
    socket_dir = parse_qs(urlsplit(url).query)["host"][0]
    return pg8000.native.Connection(
        user="postgres", unix_sock=f"{socket_dir}/.s.PGSQL.5432", database="postgres"
    )


def test_valkey_answers_on_loopback_and_is_gone_after_stop(tmp_path: Path) -> None:
    server = start_valkey(tmp_path)
    client = redis.Redis.from_url(server.url, socket_connect_timeout=1)

    assert urlsplit(server.url).hostname == LOOPBACK
    assert client.ping()
    client.set("greeting", "hello")
    assert client.get("greeting") == b"hello"

    server.stop()
    server.stop()

    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(server.url, socket_connect_timeout=1).ping()
    assert processes_mentioning(tmp_path) == []


def test_valkey_on_a_port_another_server_holds_fails_with_the_log_tail(tmp_path: Path) -> None:
    # The other server answers PING on that port: the start must notice its own process died.
    holder = start_valkey(tmp_path / "holder")
    try:
        port = urlsplit(holder.url).port
        assert port is not None

        with pytest.raises(RuntimeError, match="Address already in use"):
            start_valkey(tmp_path / "second", port=port)
    finally:
        holder.stop()

    assert processes_mentioning(tmp_path) == []


@pytest.mark.cluster
def test_cluster_spreads_keys_over_every_primary_and_stops_them_all(tmp_path: Path) -> None:
    cluster = start_valkey_cluster(tmp_path)
    try:
        client = RedisCluster.from_url(cluster.url)
        for number in range(100):
            client.set(f"session:{number}", number)
        assert client.get("session:42") == b"42"

        for node in cluster.nodes:
            host, port = node.split(":")
            direct = redis.Redis(host=host, port=int(port))
            assert direct.cluster("INFO")["cluster_state"] == "ok"
            assert direct.dbsize() > 0, f"no key landed on {node}"
        client.close()
    finally:
        cluster.stop()
    cluster.stop()

    assert len(cluster.nodes) == 3
    for node in cluster.nodes:
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(f"redis://{node}", socket_connect_timeout=1).ping()
    assert processes_mentioning(tmp_path) == []


@pytest.mark.cluster
def test_cluster_that_fails_to_form_stops_the_nodes_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(servers, "valkey_cli_binary", lambda: Path("/bin/false"))

    with pytest.raises(RuntimeError, match="--cluster create failed"):
        start_valkey_cluster(tmp_path)

    assert processes_mentioning(tmp_path) == []


def test_cluster_needs_three_primaries(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 3"):
        start_valkey_cluster(tmp_path, primaries=2)


@pytest.mark.parametrize("tool", ["cryptography", "openssl"])
def test_tls_files_pass_strict_verification_for_loopback_names(
    tmp_path: Path, tool: Literal["cryptography", "openssl"]
) -> None:
    # Checked with a Python TLS server so the certificates are tested even where the shipped
    # valkey-server cannot serve TLS.
    files = make_tls_files(tmp_path, tool=tool)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(files.cert_file, files.key_file)
    listener = socket.create_server((LOOPBACK, 0))
    port = listener.getsockname()[1]

    def serve(handshakes: int) -> None:
        for _ in range(handshakes):
            conn, _ = listener.accept()
            try:
                with server_context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                conn.close()

    server = threading.Thread(target=serve, args=(3,), daemon=True)
    server.start()
    trusting = ssl.create_default_context(cafile=files.ca_file)
    trusting.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        for name in ("localhost", LOOPBACK):
            with (
                socket.create_connection((LOOPBACK, port), timeout=5) as raw,
                trusting.wrap_socket(raw, server_hostname=name) as tls,
            ):
                assert tls.version() is not None

        with (
            socket.create_connection((LOOPBACK, port), timeout=5) as raw,
            pytest.raises(ssl.SSLCertVerificationError),
        ):
            ssl.create_default_context().wrap_socket(raw, server_hostname="localhost")
    finally:
        server.join(5)
        listener.close()


@pytest.mark.skipif(not valkey_supports_tls(), reason="shipped valkey-server has no TLS")
def test_valkey_tls_accepts_only_clients_that_trust_the_ca(tmp_path: Path) -> None:
    server = start_valkey_tls(tmp_path)
    try:
        assert server.url.startswith("rediss://")
        assert redis.Redis.from_url(server.url, ssl_ca_certs=str(server.ca_file)).ping()
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            redis.Redis.from_url(server.url).ping()
    finally:
        server.stop()
    assert processes_mentioning(tmp_path) == []


@pytest.mark.skipif(valkey_supports_tls(), reason="shipped valkey-server has TLS")
def test_valkey_tls_without_a_tls_build_says_so(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="built without TLS"):
        start_valkey_tls(tmp_path)
    assert processes_mentioning(tmp_path) == []


def test_postgres_answers_on_its_socket_and_is_gone_after_stop(tmp_path: Path) -> None:
    server = start_postgres(tmp_path)
    conn = pg_connect(server.url)

    assert urlsplit(server.url).scheme == "postgresql"
    assert conn.run("SELECT 1") == [[1]]
    conn.close()

    server.stop()
    server.stop()

    with pytest.raises(pg8000.exceptions.InterfaceError):
        pg_connect(server.url)
    assert processes_mentioning(tmp_path) == []


def test_postgres_restarts_on_the_data_it_kept(tmp_path: Path) -> None:
    first = start_postgres(tmp_path)
    conn = pg_connect(first.url)
    conn.run("CREATE TABLE kept (id int)")
    conn.close()
    first.stop()

    second = start_postgres(tmp_path)
    try:
        conn = pg_connect(second.url)
        assert conn.run("SELECT count(*) FROM kept") == [[0]]
        conn.close()
    finally:
        second.stop()


def test_local_servers_stop_both_even_when_the_body_fails(tmp_path: Path) -> None:
    with pytest.raises(KeyError), local_servers(tmp_path) as (valkey, postgres):
        assert redis.Redis.from_url(valkey.url).ping()
        pg_connect(postgres.url).close()
        raise KeyError("body failed")

    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(valkey.url, socket_connect_timeout=1).ping()
    with pytest.raises(pg8000.exceptions.InterfaceError):
        pg_connect(postgres.url)
    assert processes_mentioning(tmp_path) == []


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(5)

    assert len(set(ports)) == 5
    for port in ports:
        with socket.socket() as sock:
            sock.bind((LOOPBACK, port))
