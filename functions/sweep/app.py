"""sweep: on the EventBridge schedule, collect sessions that died without being collected."""

from typing import Any

from aws_lambda_powertools.utilities.typing import LambdaContext

from session_gc.events import parse_sweep_event
from session_gc.observability import logger, metrics, tracer
from session_gc.runs import Deadline
from session_gc.runtime import Runtime
from session_gc.sweep import sweep

RUNTIME = Runtime.from_env()  # cold start: a bad setting fails here, naming the variable


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = parse_sweep_event(event)
    result = sweep(
        RUNTIME,
        dry_run=request.dry_run or RUNTIME.settings.dry_run,
        override=request.override,
        deadline=Deadline.from_context(context),
    )
    return result.to_json()
