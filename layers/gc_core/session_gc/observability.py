"""One Logger, Metrics and Tracer for the whole package (Powertools reads its env vars)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aws_lambda_powertools import Logger, Metrics

if TYPE_CHECKING:
    from aws_lambda_powertools import Tracer

SERVICE = "session-gc"
NAMESPACE = "SessionGC"

logger = Logger(service=SERVICE)
metrics = Metrics(service=SERVICE, namespace=NAMESPACE)


def __getattr__(name: str) -> Tracer:
    # Outside Lambda the X-Ray SDK builds a botocore client at import (~20 MiB, ~250 ms).
    # Only the handlers trace, so the Tracer is built on first import by a handler, never
    # by the core, the CLI or the benchmark.
    if name == "tracer":
        from aws_lambda_powertools import Tracer

        tracer = Tracer(service=SERVICE)
        globals()["tracer"] = tracer
        return tracer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
