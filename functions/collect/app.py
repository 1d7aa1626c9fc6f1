"""collect: an SQS batch of ended sessions, collected in one pass, failures reported per message."""

from typing import Any

from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.typing import LambdaContext

from session_gc.collect import collect_records
from session_gc.observability import logger, metrics, tracer
from session_gc.runtime import Runtime

RUNTIME = Runtime.from_env()  # cold start: a bad setting fails here, naming the variable
processor = BatchProcessor(event_type=EventType.SQS)


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    batch = collect_records(RUNTIME, event.get("Records", []), dry_run=RUNTIME.settings.dry_run)
    return process_partial_response(
        event=event, record_handler=batch.settle, processor=processor, context=context
    )
