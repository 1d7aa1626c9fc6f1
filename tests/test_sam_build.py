"""What `sam build` produced works as Lambda will load it (scripts/sam_build_check.py).

The tests on the real build need `make sam-build` first and skip without it, or when the
build no longer matches the sources. The checker's own tests build small fake layers and
functions, so they show that each check can fail.
"""

from __future__ import annotations

import importlib.util
import platform
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cfnlint.decode.cfn_yaml import load as load_cfn_yaml

ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR = ROOT / ".aws-sam" / "build"


def _load_checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "sam_build_check", ROOT / "scripts" / "sam_build_check.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


checker = _load_checker()
FUNCTIONS = sorted(
    name
    for name, resource in load_cfn_yaml(str(ROOT / "template.yaml"))["Resources"].items()
    if resource["Type"] == "AWS::Serverless::Function"
)


@pytest.fixture(scope="module")
def python313() -> str:
    try:
        return str(checker.find_python())
    except LookupError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def build() -> Any:
    if not (BUILD_DIR / "template.yaml").is_file():
        pytest.skip("no `sam build` output in .aws-sam/build: run `make sam-build`")
    found = checker.load_build(BUILD_DIR)
    stale = checker.stale_files(found)
    if stale:
        pytest.skip(f"the SAM build is older than the sources ({stale[0]}): run `make sam-build`")
    return found


# -- the real build ----------------------------------------------------------------------------


def test_built_layer_holds_the_core_package_and_its_schema(build: Any) -> None:
    layers = build.layers

    assert list(layers) == ["GcCoreLayer"]
    assert checker.layer_problems(layers["GcCoreLayer"]) == []


def test_built_compiled_modules_are_arm64_for_python313_including_hiredis(build: Any) -> None:
    layer = build.layers["GcCoreLayer"]

    assert "hiredis.hiredis" in checker.extension_modules(layer)
    assert checker.extension_problems(layer, "arm64") == []


def test_built_functions_are_the_templates_three_arm64_handlers(build: Any) -> None:
    functions = build.functions

    assert sorted(functions) == FUNCTIONS
    for function in functions.values():
        assert function.architecture == "arm64"
        assert function.layers == ["GcCoreLayer"]
        assert (function.built / "app.py").is_file()


@pytest.mark.parametrize("name", FUNCTIONS)
def test_built_handler_imports_in_a_bare_python313_from_the_build_alone(
    build: Any, python313: str, name: str
) -> None:
    function = build.functions[name]

    problems, _ = checker.import_problems(build, function, python313)

    assert problems == []


# -- the checker can fail ----------------------------------------------------------------------


def _elf(machine: int) -> bytes:
    # e_ident (64-bit, little endian), e_type ET_DYN, then e_machine.
    return (
        b"\x7fELF\x02\x01\x01"
        + bytes(9)
        + (3).to_bytes(2, "little")
        + machine.to_bytes(2, "little")
    )


def _fake_build(tmp_path: Path, app: str, layer_files: dict[str, bytes], arch: str) -> Any:
    function_dir = tmp_path / "Fn"
    function_dir.mkdir()
    (function_dir / "app.py").write_text(app)
    layer = tmp_path / "Layer"
    for relative, content in layer_files.items():
        path = layer / "python" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    (layer / "python").mkdir(parents=True, exist_ok=True)
    function = checker.Function(
        name="Fn",
        built=function_dir,
        source=function_dir,
        handler="app.lambda_handler",
        architecture=arch,
        layers=["Layer"],
    )
    return checker.Build(tmp_path, layers={"Layer": layer}, functions={"Fn": function})


def _import_problems(fake: Any, python313: str) -> list[str]:
    problems, _ = checker.import_problems(fake, fake.functions["Fn"], python313)
    return list(problems)


HANDLER = "def lambda_handler(event, context):\n    return event\n"


def test_checker_reports_a_layer_without_the_schema(tmp_path: Path) -> None:
    (tmp_path / "python" / "session_gc").mkdir(parents=True)
    (tmp_path / "python" / "session_gc" / "__init__.py").write_text("")

    assert checker.layer_problems(tmp_path) == [
        f"layer {tmp_path.name} lacks python/session_gc/sql/schema.sql"
    ]


def test_checker_reports_compiled_modules_of_another_machine_or_python(tmp_path: Path) -> None:
    fake = _fake_build(
        tmp_path,
        HANDLER,
        {
            "good/_fast.cpython-313-aarch64-linux-gnu.so": _elf(183),
            "intel/_fast.cpython-313-aarch64-linux-gnu.so": _elf(62),
            "old/_fast.cpython-312-aarch64-linux-gnu.so": _elf(183),
        },
        "arm64",
    )
    layer = fake.layers["Layer"]

    problems = checker.extension_problems(layer, "arm64")

    assert sorted(checker.extension_modules(layer)) == ["good._fast", "intel._fast", "old._fast"]
    assert [p.split(" ", 1)[0] for p in problems] == ["intel._fast", "old._fast"]


def test_checker_accepts_a_layer_whose_handler_imports_from_it(
    tmp_path: Path, python313: str
) -> None:
    app = "import corelib\nlambda_handler = corelib.handle\n"
    corelib = b"def handle(event, context):\n    return event\n"
    fake = _fake_build(tmp_path, app, {"corelib/__init__.py": corelib}, "arm64")

    assert _import_problems(fake, python313) == []


def test_checker_reports_a_dependency_missing_from_the_layer(
    tmp_path: Path, python313: str
) -> None:
    fake = _fake_build(tmp_path, "import session_gc\n" + HANDLER, {}, "arm64")

    assert _import_problems(fake, python313) == [
        "Fn (app.lambda_handler): import failed: ModuleNotFoundError: No module named 'session_gc'"
    ]


def test_checker_hides_the_interpreters_own_site_packages(tmp_path: Path, python313: str) -> None:
    # pip sits in every interpreter's site-packages, never in a Lambda layer.
    fake = _fake_build(tmp_path, "import pip\n" + HANDLER, {}, "arm64")

    assert _import_problems(fake, python313) == [
        "Fn (app.lambda_handler): import failed: ModuleNotFoundError: No module named 'pip'"
    ]


def test_checker_reports_a_module_without_the_handler(tmp_path: Path, python313: str) -> None:
    fake = _fake_build(tmp_path, "def handler(event, context):\n    pass\n", {}, "arm64")

    assert _import_problems(fake, python313) == [
        "Fn (app.lambda_handler): module 'app' has no callable 'lambda_handler'"
    ]


def test_checker_reports_a_handler_module_that_connects_at_import(
    tmp_path: Path, python313: str
) -> None:
    app = "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n" + HANDLER
    fake = _fake_build(tmp_path, app, {}, "arm64")

    problems = _import_problems(fake, python313)

    assert len(problems) == 2
    assert "import failed: ConnectionRefusedError: network at import" in problems[0]
    assert "opened the network at import: socket." in problems[1]


@pytest.mark.skipif(platform.machine() != "x86_64", reason="loads x86_64 compiled modules")
def test_checker_loads_compiled_modules_when_the_host_matches_the_architecture(
    tmp_path: Path, python313: str
) -> None:
    # A real extension of python3.13 itself loads; a truncated one is reported.
    dynload = Path(python313).resolve().parent.parent / "lib" / "python3.13" / "lib-dynload"
    real = next(dynload.glob("_bisect.cpython-313-x86_64-linux-gnu.so"), None)
    if real is None:
        pytest.skip(f"no _bisect extension module in {dynload}")
    fake = _fake_build(
        tmp_path,
        HANDLER,
        {
            "ext/_bisect.cpython-313-x86_64-linux-gnu.so": real.read_bytes(),
            "ext/_broken.cpython-313-x86_64-linux-gnu.so": _elf(62),
        },
        "x86_64",
    )

    problems = _import_problems(fake, python313)

    assert len(problems) == 1
    assert problems[0].startswith("Fn (app.lambda_handler): compiled module ext._broken does not")
