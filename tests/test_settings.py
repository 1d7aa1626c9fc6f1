"""Settings are read once from the environment; a bad value fails and names its variable."""

from __future__ import annotations

import pytest

from session_gc.errors import ConfigError
from session_gc.settings import DatabaseTarget, Settings, load_settings, parse_database_url

VALKEY = "redis://localhost:6379/0"
DATABASE = "postgresql://gc:s3cr3t-pw@db.internal:5432/agents"
BASE = {"VALKEY_URL": VALKEY, "DATABASE_URL": DATABASE}


def load(**env: str) -> Settings:
    return load_settings({**BASE, **env})


def test_defaults_apply_when_only_the_required_variables_are_set() -> None:
    settings = load_settings(BASE)

    assert settings == Settings(valkey_url=VALKEY, database_url=DATABASE)
    assert (settings.key_prefix, settings.valkey_cluster, settings.dry_run) == (
        "mosaic",
        False,
        False,
    )
    assert settings.sweep_grace_seconds == 3600
    assert settings.hot_log_max_age_hours == 24.0
    assert settings.job_retention_hours == 168.0
    assert settings.temp_store_url is None
    assert settings.collect_queue_url is None
    assert settings.database_secret_arn is None


@pytest.mark.parametrize(
    "url", ["redis://cache:6379/2", "rediss://user:pw@cache.aws:6380/0", "unix:///run/valkey.sock"]
)
def test_valkey_url_accepts_redis_rediss_and_unix(url: str) -> None:
    assert load(VALKEY_URL=url).valkey_url == url


@pytest.mark.parametrize(("raw", "value"), [("true", True), ("false", False), ("TRUE", True)])
def test_valkey_cluster_parses_true_and_false(raw: str, value: bool) -> None:
    assert load(VALKEY_CLUSTER=raw).valkey_cluster is value


@pytest.mark.parametrize(("raw", "value"), [("true", True), ("false", False)])
def test_dry_run_parses_true_and_false(raw: str, value: bool) -> None:
    assert load(DRY_RUN=raw).dry_run is value


def test_database_url_with_host_and_port_parses_to_a_tcp_target() -> None:
    target = load().database_target

    assert target == DatabaseTarget(
        user="gc", password="s3cr3t-pw", database="agents", host="db.internal", port=5432
    )


def test_database_url_with_socket_dir_parses_to_a_unix_socket() -> None:
    settings = load(DATABASE_URL="postgresql://postgres@/postgres?host=/tmp/sock")

    target = settings.database_target
    assert target is not None
    assert target.unix_sock == "/tmp/sock/.s.PGSQL.5432"
    assert (target.user, target.database, target.password, target.host) == (
        "postgres",
        "postgres",
        None,
        None,
    )


def test_database_url_unquotes_user_and_password_and_keeps_sslmode() -> None:
    target = parse_database_url("postgres://gc%40app:p%2Fw%40rd@db:6543/logs?sslmode=require")

    assert (target.user, target.password, target.port, target.sslmode) == (
        "gc@app",
        "p/w@rd",
        6543,
        "require",
    )


def test_database_secret_arn_alone_is_accepted() -> None:
    arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:gc-db-AbCdEf"

    settings = load_settings({"VALKEY_URL": VALKEY, "DATABASE_SECRET_ARN": arn})

    assert settings.database_secret_arn == arn
    assert settings.database_url is None
    assert settings.database_target is None


@pytest.mark.parametrize(
    ("var", "raw", "field", "value"),
    [
        ("KEY_PREFIX", "tenant-7", "key_prefix", "tenant-7"),
        ("KEY_PREFIX", "app:mosaic", "key_prefix", "app:mosaic"),
        ("SWEEP_GRACE_SECONDS", "7200", "sweep_grace_seconds", 7200),
        ("SWEEP_GRACE_SECONDS", "0", "sweep_grace_seconds", 0),
        ("SWEEP_MAX_COLLECT_RATIO", "0.25", "sweep_max_collect_ratio", 0.25),
        ("HOT_LOG_MAX_AGE_HOURS", "48", "hot_log_max_age_hours", 48.0),
        ("HOT_LOG_MAX_AGE_HOURS", "0.5", "hot_log_max_age_hours", 0.5),
        ("JOB_RETENTION_HOURS", "72", "job_retention_hours", 72.0),
        ("TEMP_STORE_URL", "s3://gc-temp/sessions", "temp_store_url", "s3://gc-temp/sessions"),
        ("TEMP_STORE_URL", "file:///mnt/efs/tmp", "temp_store_url", "file:///mnt/efs/tmp"),
        ("TEMP_STORE_URL", "", "temp_store_url", None),
        (
            "COLLECT_QUEUE_URL",
            "https://sqs.eu-west-1.amazonaws.com/123456789012/collect",
            "collect_queue_url",
            "https://sqs.eu-west-1.amazonaws.com/123456789012/collect",
        ),
    ],
)
def test_each_variable_is_parsed_into_its_field(
    var: str, raw: str, field: str, value: object
) -> None:
    assert getattr(load(**{var: raw}), field) == value


@pytest.mark.parametrize(
    ("var", "raw"),
    [
        ("VALKEY_URL", "http://cache:6379"),
        ("VALKEY_URL", "redis://"),
        ("VALKEY_URL", "redis://cache:port/0"),
        ("VALKEY_URL", "unix://"),
        ("VALKEY_CLUSTER", "maybe"),
        ("DRY_RUN", "perhaps"),
        ("SWEEP_GRACE_SECONDS", "-1"),
        ("SWEEP_GRACE_SECONDS", "1.5"),
        ("SWEEP_GRACE_SECONDS", "an hour"),
        ("SWEEP_MAX_COLLECT_RATIO", "1.5"),
        ("SWEEP_MAX_COLLECT_RATIO", "nan"),
        ("HOT_LOG_MAX_AGE_HOURS", "-3"),
        ("JOB_RETENTION_HOURS", "inf"),
        ("KEY_PREFIX", "mo*saic"),
        ("KEY_PREFIX", "mosaic:"),
        ("KEY_PREFIX", "my app"),
        ("KEY_PREFIX", ""),
        ("TEMP_STORE_URL", "ftp://x"),
        ("TEMP_STORE_URL", "file://relative/dir"),
        ("TEMP_STORE_URL", "s3://"),
        ("DATABASE_URL", "mysql://u:p@db/x"),
        ("DATABASE_URL", "postgresql://u:p@db:notaport/x"),
        ("DATABASE_URL", "postgresql://u@/x"),
        ("GC_UNLINK_BATCH", "0"),
        ("JOB_QUEUE_NAME", "two words"),
    ],
)
def test_bad_value_raises_config_error_naming_the_variable(var: str, raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(**{var: raw})

    assert var in str(caught.value)


def test_missing_valkey_url_raises_naming_it() -> None:
    with pytest.raises(ConfigError, match="VALKEY_URL"):
        load_settings({"DATABASE_URL": DATABASE})


def test_missing_database_url_and_secret_raises_naming_both() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"VALKEY_URL": VALKEY})

    assert "DATABASE_URL" in str(caught.value)
    assert "DATABASE_SECRET_ARN" in str(caught.value)


def test_empty_database_url_counts_as_missing() -> None:
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        load_settings({"VALKEY_URL": VALKEY, "DATABASE_URL": ""})


def test_keyword_overrides_beat_the_environment() -> None:
    settings = load_settings(
        {**BASE, "KEY_PREFIX": "env-prefix", "DRY_RUN": "false", "SWEEP_GRACE_SECONDS": "10"},
        key_prefix="given",
        dry_run=True,
        sweep_grace_seconds=99,
    )

    assert (settings.key_prefix, settings.dry_run, settings.sweep_grace_seconds) == (
        "given",
        True,
        99,
    )


def test_keyword_override_skips_parsing_a_bad_environment_value() -> None:
    settings = load_settings({**BASE, "VALKEY_CLUSTER": "maybe"}, valkey_cluster=True)

    assert settings.valkey_cluster is True


def test_overrides_alone_need_no_environment() -> None:
    settings = load_settings({}, valkey_url=VALKEY, database_url=DATABASE)

    assert (settings.valkey_url, settings.database_url) == (VALKEY, DATABASE)


@pytest.mark.parametrize(
    "valkey_url",
    [
        "redis://:s3cr3t-pw@cache:6379/0",
        "rediss://default:s3cr3t-pw@cache:6380/0",
        "redis://cache:6379/0?password=s3cr3t-pw",
        "rediss://cache:6380/0?ssl_cert_reqs=none&password=s3cr3t-pw",
    ],
)
def test_repr_of_settings_never_shows_a_password(valkey_url: str) -> None:
    settings = load(VALKEY_URL=valkey_url)

    shown = repr(settings)

    assert "s3cr3t-pw" not in shown
    assert "cache" in shown  # still says where it points


def test_repr_of_database_target_never_shows_the_password() -> None:
    target = parse_database_url(DATABASE)

    shown = repr(target)

    assert "s3cr3t-pw" not in shown
    assert "db.internal:5432" in shown
    assert "s3cr3t-pw" not in str(target)


@pytest.mark.parametrize(
    "valkey_url",
    ["http://u:s3cr3t-pw@cache:6379", "redis://:s3cr3t-pw@:6379", "unix://?password=s3cr3t-pw"],
)
def test_config_error_for_valkey_url_never_shows_the_password(valkey_url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(VALKEY_URL=valkey_url)

    assert "VALKEY_URL" in str(caught.value)
    assert "s3cr3t-pw" not in str(caught.value)
