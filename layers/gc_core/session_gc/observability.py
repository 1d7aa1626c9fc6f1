"""One Logger, Metrics and Tracer for the whole package (Powertools reads its env vars)."""

from aws_lambda_powertools import Logger, Metrics, Tracer

SERVICE = "session-gc"
NAMESPACE = "SessionGC"

logger = Logger(service=SERVICE)
metrics = Metrics(service=SERVICE, namespace=NAMESPACE)
tracer = Tracer(service=SERVICE)
