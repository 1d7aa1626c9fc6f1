"""template.yaml lints clean, and its SAM translation keeps the settings operators rely on.

Generated logical ids carry hash suffixes, so resources are found by type; functions are
told apart by the code folder they deploy. Conditional parts (Fn::If on optional parameters)
are checked as deployed: with every option given, and with none.
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

from session_gc.settings import parse_database_url

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


def test_cfn_lint_reports_no_errors_or_warnings() -> None:
    matches = lint_file(TEMPLATE)

    found = [str(m) for m in matches if m.rule.id.startswith(("E", "W"))]
    assert found == []


def test_three_functions_run_python313_on_arm64_traced_with_the_core_layer(cfn: Json) -> None:
    [layer_name] = of_type(cfn, "AWS::Lambda::LayerVersion")
    layer = cfn["Resources"][layer_name]["Properties"]

    assert layer["CompatibleRuntimes"] == ["python3.13"]
    assert layer["CompatibleArchitectures"] == ["arm64"]
    assert sorted(functions(cfn)) == ["collect", "full_gc", "sweep"]
    for _, props in functions(cfn).values():
        assert props["Runtime"] == "python3.13"
        assert props["Architectures"] == ["arm64"]
        assert props["Handler"] == "app.lambda_handler"
        assert props["TracingConfig"] == {"Mode": "Active"}
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


def test_no_environment_variable_or_parameter_holds_a_secret_value(cfn: Json) -> None:
    secret_like = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL", re.IGNORECASE)

    for _, props in functions(cfn).values():
        for name in props["Environment"]["Variables"]:
            assert not secret_like.search(name) or name.endswith("_SECRET_ARN"), name
    for name in cfn["Parameters"]:
        assert not secret_like.search(name) or name.endswith(("SecretArn", "KmsKeyArn")), name


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


# -- deployed views: conditions resolved for a set of parameter values -------------------------

NO_VALUE = {"Ref": "AWS::NoValue"}
PSEUDO = {
    "AWS::Region": "eu-west-1",
    "AWS::AccountId": "123456789012",
    "AWS::Partition": "aws",
    "AWS::StackName": "session-gc-prod",
}
KMS_KEY = "arn:aws:kms:eu-west-1:123456789012:key/00000000-0000-0000-0000-000000000000"


def samconfig_overrides(env: str) -> dict[str, str]:
    envs = tomllib.loads((ROOT / "samconfig.toml").read_text())
    overrides = envs[env]["deploy"]["parameters"]["parameter_overrides"]
    return dict(o.split("=", 1) for o in overrides)


def required_parameters() -> set[str]:
    parameters = load_cfn_yaml(str(TEMPLATE))["Parameters"]
    return {name for name, spec in parameters.items() if "Default" not in spec}


# prod's settings plus a customer-managed key and a stack-managed temp bucket (expiring after
# a non-default number of days): every optional part of the template is on.
EVERY_OPTION = {
    **samconfig_overrides("prod"),
    "SecretsKmsKeyArn": KMS_KEY,
    "ManageTempBucket": "true",
    "TempFilesExpireDays": "3",
}
# Only what must be given: every optional part is off.
NO_OPTION = {k: v for k, v in samconfig_overrides("prod").items() if k in required_parameters()}
DEPLOYMENTS = {"every-option": EVERY_OPTION, "no-option": NO_OPTION}


def parameter(cfn: Json, params: dict[str, str], name: str) -> str:
    if name in PSEUDO:
        return PSEUDO[name]
    return params.get(name, str(cfn["Parameters"][name].get("Default", "")))


def conditions(cfn: Json, params: dict[str, str]) -> dict[str, bool]:
    truth: dict[str, bool] = {}

    def value(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        [(fn, arg)] = node.items()
        evaluate = {
            "Ref": lambda: parameter(cfn, params, arg),
            "Condition": lambda: holds(arg),
            "Fn::Equals": lambda: value(arg[0]) == value(arg[1]),
            "Fn::Not": lambda: not value(arg[0]),
            "Fn::And": lambda: all(value(a) for a in arg),
            "Fn::Or": lambda: any(value(a) for a in arg),
        }
        return evaluate[fn]()

    def holds(name: str) -> bool:
        if name not in truth:
            truth[name] = bool(value(cfn["Conditions"][name]))
        return truth[name]

    for name in cfn["Conditions"]:
        holds(name)
    return truth


def resolve(node: Any, truth: dict[str, bool]) -> Any:
    """Fn::If taken as deployed; AWS::NoValue dropped. Other intrinsics stay as written."""
    if isinstance(node, dict):
        if set(node) == {"Fn::If"}:
            name, yes, no = node["Fn::If"]
            return resolve(yes if truth[name] else no, truth)
        resolved = {key: resolve(value, truth) for key, value in node.items()}
        return {key: value for key, value in resolved.items() if value != NO_VALUE}
    if isinstance(node, list):
        return [value for value in (resolve(v, truth) for v in node) if value != NO_VALUE]
    return node


def deployed(cfn: Json, params: dict[str, str]) -> Json:
    truth = conditions(cfn, params)
    view: Json = resolve(cfn, truth)
    for section in ("Resources", "Outputs"):
        view[section] = {
            name: res
            for name, res in view[section].items()
            if "Condition" not in res or truth[res["Condition"]]
        }
    return view


@pytest.fixture(scope="module", params=sorted(DEPLOYMENTS))
def deployment(request: pytest.FixtureRequest, cfn: Json) -> tuple[str, Json]:
    return request.param, deployed(cfn, DEPLOYMENTS[request.param])


def render(node: Any, cfn: Json, params: dict[str, str]) -> str:
    """The string a resolved value becomes at deploy time (resources show as <LogicalId>)."""
    if isinstance(node, str | int | float):
        return str(node)
    [(fn, arg)] = node.items()
    if fn == "Ref":
        return f"<{arg}>" if arg in cfn["Resources"] else parameter(cfn, params, arg)
    if fn == "Fn::Sub":
        return re.sub(r"\$\{([^}]+)\}", lambda m: parameter(cfn, params, m[1]), arg)
    raise AssertionError(f"cannot render {node}")


# -- IAM -----------------------------------------------------------------------------------------


def label(resource: Any) -> str:
    """An IAM Resource as written: "*", "Ref Param", "Logical.Arn" or a Sub template."""
    if isinstance(resource, str):
        return resource
    [(fn, arg)] = resource.items()
    if fn == "Ref":
        return f"Ref {arg}"
    if fn == "Fn::GetAtt":
        return ".".join(arg)
    if fn == "Fn::Sub":
        return str(arg)
    raise AssertionError(f"unexpected IAM resource {resource}")


def role_statements(view: Json, role_name: str) -> list[Json]:
    """Inline statements plus those of every managed policy attached to the role."""
    role = view["Resources"][role_name]["Properties"]
    statements = [s for p in role.get("Policies", []) for s in p["PolicyDocument"]["Statement"]]
    for arn in role.get("ManagedPolicyArns", []):
        policy = view["Resources"][arn["Ref"]]  # an AWS-managed ARN fails here, on purpose
        statements += policy["Properties"]["PolicyDocument"]["Statement"]
    for policy in view["Resources"].values():
        if policy["Type"] in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy") and {
            "Ref": role_name
        } in policy["Properties"].get("Roles", []):
            statements += policy["Properties"]["PolicyDocument"]["Statement"]
    return statements


def grants(statements: list[Json]) -> dict[str, set[str]]:
    """action -> labels of the resources it is allowed on."""
    found: dict[str, set[str]] = {}
    for statement in statements:
        assert statement["Effect"] == "Allow", statement
        actions = statement["Action"]
        resources = statement["Resource"]
        for action in [actions] if isinstance(actions, str) else actions:
            labels = [resources] if not isinstance(resources, list) else resources
            found.setdefault(action, set()).update(label(r) for r in labels)
    return found


def function_grants(view: Json) -> dict[str, dict[str, set[str]]]:
    """Code folder -> what its role allows."""
    return {
        folder: grants(role_statements(view, props["Role"]["Fn::GetAtt"][0]))
        for folder, (_, props) in functions(view).items()
    }


ANY = "*"
ENIS = "arn:${AWS::Partition}:ec2:${AWS::Region}:*:*"
BUCKET = "arn:${AWS::Partition}:s3:::${TempBucketName}"
TEMP_FILES = "arn:${AWS::Partition}:s3:::${TempBucketName}/${TempPrefix}/*"
DB_SECRET, VALKEY_SECRET = "Ref DatabaseSecretArn", "Ref ValkeyAuthSecretArn"
QUEUE = "CollectQueue.Arn"
# Lambda's side, the same for all three: VPC network interfaces and X-Ray.
PLATFORM = {
    "ec2:DescribeNetworkInterfaces": {ANY},
    "ec2:DescribeSubnets": {ANY},
    "ec2:CreateNetworkInterface": {ENIS},
    "ec2:DeleteNetworkInterface": {ENIS},
    "ec2:AssignPrivateIpAddresses": {ENIS},
    "ec2:UnassignPrivateIpAddresses": {ENIS},
    "xray:PutTraceSegments": {ANY},
    "xray:PutTelemetryRecords": {ANY},
}
TEMP = {"s3:ListBucket": {BUCKET}, "s3:DeleteObject": {TEMP_FILES}}
DECRYPT = {"kms:Decrypt": {"Ref SecretsKmsKeyArn"}}
POLL = {a: {QUEUE} for a in ("sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes")}


def own_logs(log_group: str) -> dict[str, set[str]]:
    return {a: {f"{log_group}.Arn"} for a in ("logs:CreateLogStream", "logs:PutLogEvents")}


EXPECTED_GRANTS = {
    "every-option": {
        "collect": PLATFORM
        | own_logs("CollectLogGroup")
        | POLL
        | {"secretsmanager:GetSecretValue": {DB_SECRET, VALKEY_SECRET}}
        | DECRYPT
        | TEMP,
        # The sweep only fans out: Valkey (and its AUTH secret), the collect queue, and a
        # listing of the temp folders to find orphans.
        "sweep": PLATFORM
        | own_logs("SweepLogGroup")
        | {"sqs:SendMessage": {QUEUE}}
        | {"secretsmanager:GetSecretValue": {VALKEY_SECRET}}
        | DECRYPT
        | {"s3:ListBucket": {BUCKET}},
        "full_gc": PLATFORM
        | own_logs("FullGcLogGroup")
        | {"secretsmanager:GetSecretValue": {DB_SECRET, VALKEY_SECRET}}
        | DECRYPT
        | TEMP,
    },
    "no-option": {
        "collect": PLATFORM
        | own_logs("CollectLogGroup")
        | POLL
        | {"secretsmanager:GetSecretValue": {DB_SECRET}},
        "sweep": PLATFORM | own_logs("SweepLogGroup") | {"sqs:SendMessage": {QUEUE}},
        "full_gc": PLATFORM
        | own_logs("FullGcLogGroup")
        | {"secretsmanager:GetSecretValue": {DB_SECRET}},
    },
}


def test_each_function_role_allows_exactly_its_actions_on_its_resources(
    deployment: tuple[str, Json],
) -> None:
    name, view = deployment

    assert function_grants(view) == EXPECTED_GRANTS[name]


def test_each_function_has_a_role_of_its_own_that_only_lambda_assumes(cfn: Json) -> None:
    roles = {
        folder: props["Role"]["Fn::GetAtt"][0] for folder, (_, props) in functions(cfn).items()
    }

    assert len(set(roles.values())) == 3
    for role_name in roles.values():
        role = cfn["Resources"][role_name]
        assert role["Type"] == "AWS::IAM::Role"
        assert role["Properties"]["AssumeRolePolicyDocument"]["Statement"] == [
            {
                "Effect": "Allow",
                "Principal": {"Service": "lambda.amazonaws.com"},
                "Action": "sts:AssumeRole",
            }
        ]
        # No AWS-managed policy (SAM's defaults allow logs on every log group).
        for arn in role["Properties"].get("ManagedPolicyArns", []):
            assert cfn["Resources"][arn["Ref"]]["Type"] == "AWS::IAM::ManagedPolicy"


def iam_documents(cfn: Json) -> Iterator[Json]:
    for res in cfn["Resources"].values():
        props = res["Properties"]
        if res["Type"] == "AWS::IAM::Role":
            yield props["AssumeRolePolicyDocument"]
            yield from (p["PolicyDocument"] for p in props.get("Policies", []))
        elif res["Type"] in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
            yield props["PolicyDocument"]
        else:
            assert not res["Type"].startswith("AWS::IAM::"), res["Type"]


def statements_in(node: Any) -> Iterator[Json]:
    """Every statement, on both sides of each Fn::If."""
    if isinstance(node, dict):
        if "Effect" in node:
            yield node
        else:
            for value in node.values():
                yield from statements_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from statements_in(value)


def test_no_iam_statement_allows_a_wildcard_action_or_a_negation(cfn: Json) -> None:
    statements = [s for doc in iam_documents(cfn) for s in statements_in(doc["Statement"])]

    assert len(statements) >= 20
    for statement in statements:
        actions = statement["Action"]
        for action in [actions] if isinstance(actions, str) else actions:
            assert re.fullmatch(r"[a-z0-9-]+:[A-Za-z]+", action), action
        assert statement["Effect"] == "Allow"
        assert not {"NotAction", "NotResource", "NotPrincipal"} & statement.keys()


def test_only_describe_and_trace_actions_reach_every_resource(
    deployment: tuple[str, Json],
) -> None:
    _, view = deployment

    unbounded = {
        action
        for allowed in function_grants(view).values()
        for action, resources in allowed.items()
        if ANY in resources
    }
    assert unbounded == {
        "ec2:DescribeNetworkInterfaces",
        "ec2:DescribeSubnets",
        "xray:PutTraceSegments",
        "xray:PutTelemetryRecords",
    }


def test_only_the_sweep_may_send_to_the_collect_queue(deployment: tuple[str, Json]) -> None:
    _, view = deployment

    senders = {
        folder: allowed["sqs:SendMessage"]
        for folder, allowed in function_grants(view).items()
        if "sqs:SendMessage" in allowed
    }
    assert senders == {"sweep": {QUEUE}}


def test_secrets_are_read_only_from_the_secret_parameters(deployment: tuple[str, Json]) -> None:
    _, view = deployment

    for folder, allowed in function_grants(view).items():
        secret_actions = {a for a in allowed if a.startswith("secretsmanager:")}
        assert secret_actions <= {"secretsmanager:GetSecretValue"}, folder
        assert allowed.get("secretsmanager:GetSecretValue", set()) <= {DB_SECRET, VALKEY_SECRET}


@pytest.mark.parametrize(
    ("params", "decrypting"),
    [
        (EVERY_OPTION, {"collect", "sweep", "full_gc"}),
        (NO_OPTION, set()),
        # Without Valkey AUTH the sweep reads no secret, so it needs no key either.
        ({**NO_OPTION, "SecretsKmsKeyArn": KMS_KEY}, {"collect", "full_gc"}),
    ],
    ids=["every-option", "no-option", "key-without-valkey-auth"],
)
def test_secrets_key_decrypts_only_through_secrets_manager_for_secret_readers(
    cfn: Json, params: dict[str, str], decrypting: set[str]
) -> None:
    view = deployed(cfn, params)

    found = set()
    for folder, (_, props) in functions(view).items():
        for statement in role_statements(view, props["Role"]["Fn::GetAtt"][0]):
            if "kms:Decrypt" not in statement["Action"]:
                continue
            found.add(folder)
            assert statement["Action"] == "kms:Decrypt"
            assert statement["Resource"] == {"Ref": "SecretsKmsKeyArn"}
            assert statement["Condition"] == {
                "StringEquals": {
                    "kms:ViaService": {"Fn::Sub": "secretsmanager.${AWS::Region}.amazonaws.com"}
                }
            }
    assert found == decrypting


def test_temp_file_listing_and_deletion_stay_under_the_temp_prefix(cfn: Json) -> None:
    view = deployed(cfn, EVERY_OPTION)

    for folder in ("collect", "sweep", "full_gc"):
        role_name = functions(view)[folder][1]["Role"]["Fn::GetAtt"][0]
        [listing] = [s for s in role_statements(view, role_name) if s["Action"] == "s3:ListBucket"]
        assert listing["Condition"] == {"StringLike": {"s3:prefix": {"Fn::Sub": "${TempPrefix}/*"}}}
    prefix = render({"Fn::Sub": "${TempPrefix}/*"}, cfn, EVERY_OPTION)
    assert prefix == "sessions/*"
    assert render({"Fn::Sub": TEMP_FILES}, cfn, EVERY_OPTION) == (
        "arn:aws:s3:::session-gc-prod-temp-123456789012/sessions/*"
    )


# -- temp files bucket ---------------------------------------------------------------------------


def temp_bucket(view: Json) -> tuple[str, Json]:
    [(name, bucket)] = of_type(view, "AWS::S3::Bucket").items()
    return name, bucket


def lifecycle_rule(view: Json, params: dict[str, str]) -> Json:
    """The managed bucket's one lifecycle rule, in the shape the S3 API (and the output) uses."""
    _, bucket = temp_bucket(view)
    [rule] = bucket["Properties"]["LifecycleConfiguration"]["Rules"]
    assert rule.keys() == {
        "Id",
        "Status",
        "Prefix",
        "ExpirationInDays",
        "AbortIncompleteMultipartUpload",
        "NoncurrentVersionExpiration",
    }
    return {
        "ID": rule["Id"],
        "Status": rule["Status"],
        "Filter": {"Prefix": render(rule["Prefix"], view, params)},
        "Expiration": {"Days": int(render(rule["ExpirationInDays"], view, params))},
        "AbortIncompleteMultipartUpload": rule["AbortIncompleteMultipartUpload"],
        "NoncurrentVersionExpiration": rule["NoncurrentVersionExpiration"],
    }


def test_managed_temp_bucket_expires_the_temp_prefix_after_the_set_days(cfn: Json) -> None:
    view = deployed(cfn, EVERY_OPTION)

    _, bucket = temp_bucket(view)
    assert render(bucket["Properties"]["BucketName"], view, EVERY_OPTION) == (
        "session-gc-prod-temp-123456789012"
    )
    # The platform's files outlive the stack.
    assert (bucket["DeletionPolicy"], bucket["UpdateReplacePolicy"]) == ("Retain", "Retain")
    assert lifecycle_rule(view, EVERY_OPTION) == {
        "ID": "expire-session-temp-files",
        "Status": "Enabled",
        "Filter": {"Prefix": "sessions/"},
        "Expiration": {"Days": 3},
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
        "NoncurrentVersionExpiration": {"NoncurrentDays": 1},
    }


def test_managed_temp_bucket_is_private_encrypted_and_without_acls(cfn: Json) -> None:
    props = temp_bucket(deployed(cfn, EVERY_OPTION))[1]["Properties"]

    assert props["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "BlockPublicPolicy": True,
        "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True,
    }
    assert props["BucketEncryption"]["ServerSideEncryptionConfiguration"] == [
        {"ServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}
    ]
    assert props["OwnershipControls"] == {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]}
    assert "VersioningConfiguration" not in props


def test_managed_temp_bucket_policy_denies_every_request_without_tls(cfn: Json) -> None:
    view = deployed(cfn, EVERY_OPTION)
    name, _ = temp_bucket(view)

    [policy] = of_type(view, "AWS::S3::BucketPolicy").values()
    assert policy["Properties"]["Bucket"] == {"Ref": name}
    assert policy["DeletionPolicy"] == "Retain"
    assert policy["Properties"]["PolicyDocument"]["Statement"] == [
        {
            "Sid": "DenyInsecureTransport",
            "Effect": "Deny",
            "Principal": "*",
            "Action": "s3:*",
            "Resource": [
                {"Fn::GetAtt": [name, "Arn"]},
                {"Fn::Sub": f"${{{name}.Arn}}/*"},
            ],
            "Condition": {"Bool": {"aws:SecureTransport": "false"}},
        }
    ]


@pytest.mark.parametrize(
    "params",
    [
        samconfig_overrides("prod"),
        NO_OPTION,
        # Every other option on, but no bucket to create.
        {**EVERY_OPTION, "TempBucketName": ""},
    ],
    ids=["bucket-owned-elsewhere", "no-option", "managed-without-bucket-name"],
)
def test_temp_bucket_is_not_created_unless_managed_and_named(
    cfn: Json, params: dict[str, str]
) -> None:
    view = deployed(cfn, params)

    s3 = [name for name, res in view["Resources"].items() if res["Type"].startswith("AWS::S3::")]
    assert s3 == []
    assert "TempBucketArn" not in view["Outputs"]


def test_unmanaged_temp_bucket_output_spells_out_the_managed_rule(cfn: Json) -> None:
    unmanaged = {**samconfig_overrides("prod"), "TempFilesExpireDays": "3"}
    view = deployed(cfn, unmanaged)
    output = view["Outputs"]["TempFilesLifecycleRule"]
    managed = deployed(cfn, EVERY_OPTION)

    assert json.loads(render(output["Value"], view, unmanaged)) == lifecycle_rule(
        managed, EVERY_OPTION
    )
    assert "TempFilesLifecycleRule" not in managed["Outputs"]
    assert "TempFilesLifecycleRule" not in deployed(cfn, NO_OPTION)["Outputs"]
    description = cfn["Parameters"]["ManageTempBucket"]["Description"]
    assert "{TempPrefix}/" in description
    assert "TempFilesLifecycleRule" in description


# -- logs and alarms -----------------------------------------------------------------------------


def test_each_function_logs_to_a_log_group_of_its_own_with_the_set_retention(cfn: Json) -> None:
    groups = {}
    for folder, (_, props) in functions(cfn).items():
        groups[folder] = props["LoggingConfig"]["LogGroup"]["Ref"]

    assert groups == {
        "collect": "CollectLogGroup",
        "sweep": "SweepLogGroup",
        "full_gc": "FullGcLogGroup",
    }
    names = set()
    for group in groups.values():
        props = cfn["Resources"][group]["Properties"]
        assert cfn["Resources"][group]["Type"] == "AWS::Logs::LogGroup"
        assert props["RetentionInDays"] == {"Ref": "LogRetentionDays"}
        names.add(render(props["LogGroupName"], cfn, EVERY_OPTION))
    assert names == {
        "/aws/lambda/session-gc-prod/collect",
        "/aws/lambda/session-gc-prod/sweep",
        "/aws/lambda/session-gc-prod/full-gc",
    }


def alarms(view: Json) -> list[Json]:
    return [res["Properties"] for res in of_type(view, "AWS::CloudWatch::Alarm").values()]


def test_dead_letter_alarm_fires_on_the_first_message_in_the_collect_dlq(cfn: Json) -> None:
    _, dlq_name = source_and_dead_letter_queues(cfn)

    [alarm] = [a for a in alarms(cfn) if a["Namespace"] == "AWS/SQS"]
    assert alarm["MetricName"] == "ApproximateNumberOfMessagesVisible"
    assert alarm["Dimensions"] == [
        {"Name": "QueueName", "Value": {"Fn::GetAtt": [dlq_name, "QueueName"]}}
    ]
    assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (0, "GreaterThanThreshold")


def test_every_function_has_an_errors_alarm(cfn: Json) -> None:
    watched = [
        dim["Value"]
        for a in alarms(cfn)
        if (a["Namespace"], a["MetricName"]) == ("AWS/Lambda", "Errors")
        for dim in a["Dimensions"]
    ]

    assert sorted(w["Ref"] for w in watched) == sorted(n for n, _ in functions(cfn).values())


def test_blast_radius_alarm_watches_the_sweeps_metric_under_its_service_dimension(
    cfn: Json,
) -> None:
    _, sweep = functions(cfn)["sweep"]
    env = sweep["Environment"]["Variables"]
    emitted = (ROOT / "layers/gc_core/session_gc/sweep.py").read_text()

    [alarm] = [a for a in alarms(cfn) if a["MetricName"] == "SweepBlastRadiusStop"]
    assert '"SweepBlastRadiusStop"' in emitted
    assert alarm["Namespace"] == env["POWERTOOLS_METRICS_NAMESPACE"]
    # Powertools (EMF) adds exactly the service dimension; any other never matches.
    assert alarm["Dimensions"] == [{"Name": "service", "Value": env["POWERTOOLS_SERVICE_NAME"]}]
    assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (1, "GreaterThanOrEqualToThreshold")


def test_alarms_notify_the_topic_only_when_one_is_given(deployment: tuple[str, Json]) -> None:
    name, view = deployment

    found = alarms(view)
    assert len(found) == 5
    for alarm in found:
        if name == "every-option":
            assert alarm["AlarmActions"] == [{"Ref": "AlarmTopicArn"}]
            assert alarm["OKActions"] == [{"Ref": "AlarmTopicArn"}]
        else:
            assert "AlarmActions" not in alarm
            assert "OKActions" not in alarm


# -- configuration and secrets -------------------------------------------------------------------


def test_functions_get_secret_arns_and_a_credential_free_database_url(cfn: Json) -> None:
    for folder, (_, props) in functions(cfn).items():
        env = props["Environment"]["Variables"]
        assert env["DATABASE_SECRET_ARN"] == {"Ref": "DatabaseSecretArn"}, folder
        assert env["VALKEY_AUTH_SECRET_ARN"] == {"Ref": "ValkeyAuthSecretArn"}, folder
        assert env["DATABASE_URL"] == {
            "Fn::Sub": "postgresql://${DatabaseEndpoint}?sslmode=verify-full"
        }
        assert env["DATABASE_CA_FILE"] == {"Ref": "DatabaseCaFile"}, folder
        assert env["VALKEY_CA_FILE"] == {"Ref": "ValkeyCaFile"}, folder


@pytest.mark.parametrize("env", ["default", "staging", "prod"])
def test_deployed_environment_holds_no_credentials(cfn: Json, env: str) -> None:
    params = samconfig_overrides(env)
    view = deployed(cfn, params)
    credential = re.compile(r"://[^/\s]*@|password|passwd|secret=|token=", re.IGNORECASE)

    for folder, (_, props) in functions(view).items():
        rendered = {
            k: render(v, view, params) for k, v in props["Environment"]["Variables"].items()
        }
        for name, value in rendered.items():
            if not name.endswith("_SECRET_ARN"):
                assert not credential.search(value), (folder, name, value)
        # The core reads the endpoint from the URL and the login from the secret.
        target = parse_database_url(rendered["DATABASE_URL"])
        host = params["DatabaseEndpoint"].split(":")[0]
        assert (target.host, target.port, target.database) == (host, 5432, "platform")
        assert target.password is None
        assert target.sslmode == "verify-full"


def pattern(name: str) -> str:
    return str(load_cfn_yaml(str(TEMPLATE))["Parameters"][name]["AllowedPattern"])


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("DatabaseEndpoint", "mydb.xxxx.eu-west-1.rds.amazonaws.com:5432/platform", True),
        ("DatabaseEndpoint", "mydb.internal/platform", True),
        ("DatabaseEndpoint", "admin:hunter2@mydb.internal:5432/platform", False),
        ("DatabaseEndpoint", "admin@mydb.internal:5432/platform", False),
        ("DatabaseEndpoint", "mydb.internal:5432/platform?password=hunter2", False),
        ("DatabaseEndpoint", "postgresql://mydb.internal:5432/platform", False),
        ("ValkeyUrl", "rediss://clustercfg.x.euw1.cache.amazonaws.com:6379", True),
        ("ValkeyUrl", "rediss://:token@clustercfg.x.euw1.cache.amazonaws.com:6379", False),
        ("DatabaseCaFile", "", True),
        ("DatabaseCaFile", "/opt/python/session_gc/certs/rds-global-bundle.pem", True),
        ("DatabaseCaFile", "certs/rds-global-bundle.pem", False),
        ("ValkeyCaFile", "/opt/python/ca.pem", True),
        ("SecretsKmsKeyArn", "", True),
        ("SecretsKmsKeyArn", KMS_KEY, True),
        ("SecretsKmsKeyArn", "alias/aws/secretsmanager", False),
    ],
)
def test_parameter_patterns_keep_credentials_out(name: str, value: str, allowed: bool) -> None:
    assert bool(re.fullmatch(pattern(name), value)) is allowed
