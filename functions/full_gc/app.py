"""full_gc: invoked by hand after a deployment; collects everything no live session owns."""

from typing import Any

from aws_lambda_powertools.utilities.typing import LambdaContext

from session_gc.events import parse_full_gc_event
from session_gc.full import full_gc
from session_gc.observability import logger, metrics, tracer
from session_gc.runs import Deadline
from session_gc.runtime import Runtime

RUNTIME = Runtime.from_env()  # cold start: a bad setting fails here, naming the variable


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = parse_full_gc_event(event)
    result = full_gc(
        RUNTIME,
        dry_run=request.dry_run or RUNTIME.settings.dry_run,
        force=request.force,
        deadline=Deadline.from_context(context),
    )
    return result.to_json()
