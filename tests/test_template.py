"""template.yaml lints clean, and its SAM translation keeps the settings operators rely on.

Generated logical ids carry hash suffixes, so resources are found by type; functions are
told apart by the code folder they deploy.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cfnlint.api import lint_file
from cfnlint.decode.cfn_yaml import load as load_cfn_yaml
from samtranslator.translator.transform import transform

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "template.yaml"
EVENTS = ROOT / "events"
PLACEHOLDER_BUCKET = "session-gc-artifacts"
LAMBDA_MAX_TIMEOUT = 900

Json = dict[str, Any]


class _NoManagedPolicies:
    """Stands in for SAM's IAM lookup; SAM then builds the managed policy ARNs itself."""

    def load(self) -> dict[str, str]:
        return {}


def _with_s3_code_uris(template: Json) -> Json:
    # The translator only accepts S3 locations; keep the folder as the key to find functions.
    for resource in template["Resources"].values():
        props = resource.get("Properties", {})
        for key in ("CodeUri", "ContentUri"):
            if isinstance(props.get(key), str):
                props[key] = f"s3://{PLACEHOLDER_BUCKET}/{props[key].strip('/')}"
    return template


@pytest.fixture(scope="module")
def cfn() -> Iterator[Json]:
    sam = json.loads(json.dumps(load_cfn_yaml(str(TEMPLATE))))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_DEFAULT_REGION", "eu-west-1")
        yield transform(_with_s3_code_uris(sam), {}, _NoManagedPolicies())


def of_type(cfn: Json, type_: str) -> dict[str, Json]:
    return {name: res for name, res in cfn["Resources"].items() if res["Type"] == type_}


def functions(cfn: Json) -> dict[str, tuple[str, Json]]:
    """Code folder (collect, sweep, full_gc) -> (logical id, properties)."""
    found = {}
    for name, res in of_type(cfn, "AWS::Lambda::Function").items():
        folder = res["Properties"]["Code"]["S3Key"].removeprefix("functions/")
        found[folder] = (name, res["Properties"])
    return found


def source_and_dead_letter_queues(cfn: Json) -> tuple[Json, str]:
    queues = of_type(cfn, "AWS::SQS::Queue")
    [source] = [
        res["Properties"] for res in queues.values() if "RedrivePolicy" in res["Properties"]
    ]
    dlq_name = source["RedrivePolicy"]["deadLetterTargetArn"]["Fn::GetAtt"][0]
    return source, dlq_name


def load_event(name: str) -> Json:
    event: Json = json.loads((EVENTS / name).read_text())
    return event


def test_cfn_lint_reports_no_errors() -> None:
    matches = lint_file(TEMPLATE)

    errors = [str(m) for m in matches if m.rule.id.startswith("E")]
    assert errors == []


def test_three_functions_run_python313_on_arm64_with_the_core_layer(cfn: Json) -> None:
    [layer_name] = of_type(cfn, "AWS::Lambda::LayerVersion")
    layer = cfn["Resources"][layer_name]["Properties"]

    assert layer["CompatibleRuntimes"] == ["python3.13"]
    assert layer["CompatibleArchitectures"] == ["arm64"]
    assert sorted(functions(cfn)) == ["collect", "full_gc", "sweep"]
    for _, props in functions(cfn).values():
        assert props["Runtime"] == "python3.13"
        assert props["Architectures"] == ["arm64"]
        assert props["Handler"] == "app.lambda_handler"
        assert {"Ref": layer_name} in props["Layers"]


def test_collect_mapping_reports_partial_failures_for_large_windowed_batches(cfn: Json) -> None:
    collect_name, _ = functions(cfn)["collect"]
    [mapping] = [m["Properties"] for m in of_type(cfn, "AWS::Lambda::EventSourceMapping").values()]

    assert mapping["FunctionName"] == {"Ref": collect_name}
    queue = cfn["Resources"][mapping["EventSourceArn"]["Fn::GetAtt"][0]]
    assert "RedrivePolicy" in queue["Properties"]
    assert "ReportBatchItemFailures" in mapping["FunctionResponseTypes"]
    assert mapping["BatchSize"] == 100
    assert mapping["MaximumBatchingWindowInSeconds"] == 10
    assert 2 <= mapping["ScalingConfig"]["MaximumConcurrency"] <= 10


def test_collect_queue_redrives_to_a_dead_letter_queue_that_outlives_it(cfn: Json) -> None:
    source, dlq_name = source_and_dead_letter_queues(cfn)
    dlq = cfn["Resources"][dlq_name]

    assert dlq["Type"] == "AWS::SQS::Queue"
    assert source["RedrivePolicy"]["maxReceiveCount"] == 5
    assert dlq["Properties"]["MessageRetentionPeriod"] > source["MessageRetentionPeriod"]
    assert source["SqsManagedSseEnabled"] is True
    assert dlq["Properties"]["SqsManagedSseEnabled"] is True


def test_visibility_timeout_covers_six_collect_timeouts_plus_the_window(cfn: Json) -> None:
    source, _ = source_and_dead_letter_queues(cfn)
    _, collect = functions(cfn)["collect"]
    [mapping] = [m["Properties"] for m in of_type(cfn, "AWS::Lambda::EventSourceMapping").values()]

    needed = 6 * collect["Timeout"] + mapping["MaximumBatchingWindowInSeconds"]
    assert source["VisibilityTimeout"] >= needed


def test_sweep_and_full_gc_never_run_twice_at_once(cfn: Json) -> None:
    found = functions(cfn)

    assert found["sweep"][1]["ReservedConcurrentExecutions"] == 1
    assert found["full_gc"][1]["ReservedConcurrentExecutions"] == 1


def test_schedule_rule_targets_the_sweep_and_nothing_triggers_full_gc(cfn: Json) -> None:
    sweep_name, sweep = functions(cfn)["sweep"]
    full_gc_name, _ = functions(cfn)["full_gc"]
    rules = [r["Properties"] for r in of_type(cfn, "AWS::Events::Rule").values()]
    targets = [t["Arn"]["Fn::GetAtt"][0] for rule in rules for t in rule["Targets"]]
    mappings = of_type(cfn, "AWS::Lambda::EventSourceMapping").values()

    assert targets == [sweep_name]
    assert all("ScheduleExpression" in rule for rule in rules)
    queue = cfn["Resources"][sweep["Environment"]["Variables"]["COLLECT_QUEUE_URL"]["Ref"]]
    assert "RedrivePolicy" in queue["Properties"]
    assert all(m["Properties"]["FunctionName"] != {"Ref": full_gc_name} for m in mappings)


def role_actions(role: Json) -> set[str]:
    actions: set[str] = set()
    for policy in role["Properties"].get("Policies", []):
        for statement in policy["PolicyDocument"]["Statement"]:
            action = statement["Action"]
            actions.update([action] if isinstance(action, str) else action)
    return actions


def test_only_the_sweep_role_may_send_to_the_collect_queue(cfn: Json) -> None:
    roles = of_type(cfn, "AWS::IAM::Role")
    sweep_role = functions(cfn)["sweep"][1]["Role"]["Fn::GetAtt"][0]

    senders = {
        name
        for name, role in roles.items()
        if any(a.startswith("sqs:SendMessage") for a in role_actions(role))
    }
    assert senders == {sweep_role}


def test_no_environment_variable_or_parameter_holds_a_secret_value(cfn: Json) -> None:
    secret_like = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL", re.IGNORECASE)

    for _, props in functions(cfn).values():
        for name in props["Environment"]["Variables"]:
            assert not secret_like.search(name) or name.endswith("_SECRET_ARN"), name
    for name in cfn["Parameters"]:
        assert not secret_like.search(name) or name.endswith("SecretArn"), name


def test_every_timeout_fits_within_lambdas_fifteen_minutes(cfn: Json) -> None:
    for folder, (_, props) in functions(cfn).items():
        assert 0 < props["Timeout"] <= LAMBDA_MAX_TIMEOUT, folder


def test_collect_event_records_carry_json_session_ids() -> None:
    records = load_event("collect.json")["Records"]

    assert [json.loads(r["body"])["sessionId"] for r in records] == [
        "sess-demo-0001",
        "sess-demo-0002",
    ]
    for record in records:
        assert record["eventSource"] == "aws:sqs"
        assert record["md5OfBody"] == hashlib.md5(record["body"].encode()).hexdigest()
        assert {"messageId", "receiptHandle", "attributes", "eventSourceARN"} <= record.keys()


def test_sweep_event_is_an_eventbridge_scheduled_event() -> None:
    event = load_event("sweep.json")

    assert event["detail-type"] == "Scheduled Event"
    assert event["source"] == "aws.events"
    assert event["detail"] == {}


def test_full_gc_event_holds_only_boolean_dry_run_and_force() -> None:
    event = load_event("full_gc.json")

    assert event.keys() <= {"dryRun", "force"}
    assert all(isinstance(value, bool) for value in event.values())
    assert event["dryRun"] is True


def test_samconfig_overrides_name_template_parameters_with_allowed_values() -> None:
    parameters = load_cfn_yaml(str(TEMPLATE))["Parameters"]
    envs = tomllib.loads((ROOT / "samconfig.toml").read_text())

    required = {name for name, spec in parameters.items() if "Default" not in spec}

    for env in ("default", "staging", "prod"):
        overrides = dict(
            o.split("=", 1) for o in envs[env]["deploy"]["parameters"]["parameter_overrides"]
        )
        assert required <= overrides.keys(), env
        for name, value in overrides.items():
            spec = parameters[name]
            assert re.fullmatch(spec.get("AllowedPattern", ".*"), value), name
            assert value in [str(v) for v in spec.get("AllowedValues", [value])], name
