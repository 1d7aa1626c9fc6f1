"""Check what `sam build` produced, as Lambda will see it.

- The layer holds the core package and its SQL schema under ``python/``.
- The build matches the sources (a stale build proves nothing about them).
- Every compiled module in the layer is built for the functions' architecture and python3.13.
- Each function's handler imports in a bare python3.13 (``-I -S``) whose ``sys.path`` holds
  only the built function folder and the layers' ``python/`` folders (Lambda's ``/var/task``
  and ``/opt/python``), without opening a single network connection; so do the modules the
  core imports only on first use (boto3 and friends).

Compiled modules (hiredis, msgpack, wrapt) built for aarch64 cannot load on an x86_64 host:
there the import runs without them (redis-py, msgpack and wrapt fall back to pure Python), and
this says so. On a host of the functions' architecture each compiled module must import too.

Usage: ``python scripts/sam_build_check.py [--build-dir DIR] [--python PATH]``. Exit status 0
when every check passes; each problem is printed on a line of its own.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR = ROOT / ".aws-sam" / "build"
RUNTIME = "python3.13"
# What a handler module may find in its environment at import; nothing here can be reached.
IMPORT_ENV = {
    "VALKEY_URL": "redis://127.0.0.1:1/0",
    "DATABASE_URL": "postgresql://u@/d?host=/tmp",
    "POWERTOOLS_TRACE_DISABLED": "true",
}
# ELF e_machine of each Lambda architecture, and the tag pip puts in extension file names.
ELF_MACHINE = {"arm64": 183, "x86_64": 62}
EXTENSION_TAG = {"arm64": "aarch64-linux-gnu", "x86_64": "x86_64-linux-gnu"}
HOST_ARCH = {"aarch64": "arm64", "arm64": "arm64", "x86_64": "x86_64", "AMD64": "x86_64"}
IMPORT_TIMEOUT_S = 60

# Runs inside the bare interpreter: argv[1] is a JSON request, stdout gets a JSON reply.
BOOTSTRAP = r"""
import importlib, json, sys
request = json.loads(sys.argv[1])
sys.path[:0] = request["path"]
network = []
def refuse_network(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "socket.sendto"):
        network.append(f"{event} {args!r}")
        raise ConnectionRefusedError(f"network at import: {event}")
sys.addaudithook(refuse_network)
reply = {"version": list(sys.version_info[:2]), "network": network, "extensions": {}}
try:
    module = importlib.import_module(request["module"])
    reply["handler"] = callable(getattr(module, request["function"], None))
except BaseException as exc:
    reply["error"] = f"{type(exc).__name__}: {exc}"
reply["deferred"] = {}
for statement in request["deferred"] if "error" not in reply else []:
    try:
        exec(statement, {})
    except BaseException as exc:
        reply["deferred"][statement] = f"{type(exc).__name__}: {exc}"
for name in request["extensions"]:
    try:
        importlib.import_module(name)
        reply["extensions"][name] = None
    except BaseException as exc:
        reply["extensions"][name] = f"{type(exc).__name__}: {exc}"
print(json.dumps(reply))
"""


@dataclass
class Function:
    name: str
    built: Path
    source: Path
    handler: str
    architecture: str
    layers: list[str]


@dataclass
class Build:
    root: Path
    layers: dict[str, Path] = field(default_factory=dict)
    functions: dict[str, Function] = field(default_factory=dict)


def load_build(
    build_dir: Path = BUILD_DIR, source_template: Path = ROOT / "template.yaml"
) -> Build:
    """Read the built template: where each layer and function landed, and what it came from."""
    from cfnlint.decode.cfn_yaml import load  # type: ignore[import-untyped]

    built: dict[str, Any] = load(str(build_dir / "template.yaml"))
    source: dict[str, Any] = load(str(source_template))
    globals_ = source.get("Globals", {}).get("Function", {})
    build = Build(build_dir)
    for name, resource in built["Resources"].items():
        props = resource.get("Properties", {})
        if resource["Type"] == "AWS::Serverless::LayerVersion":
            build.layers[name] = build_dir / props["ContentUri"]
        elif resource["Type"] == "AWS::Serverless::Function":
            source_props = source["Resources"][name]["Properties"]
            [architecture] = props.get("Architectures", globals_.get("Architectures", ["x86_64"]))
            layers = props.get("Layers", globals_.get("Layers", []))
            build.functions[name] = Function(
                name=name,
                built=build_dir / props["CodeUri"],
                source=source_template.parent / source_props["CodeUri"],
                handler=props.get("Handler", globals_.get("Handler")),
                architecture=architecture,
                layers=[layer["Ref"] for layer in layers if "Ref" in layer],
            )
    return build


def layer_problems(layer: Path) -> list[str]:
    """The core package and its schema where Lambda puts layer code on sys.path."""
    needed = ["python/session_gc/__init__.py", "python/session_gc/sql/schema.sql"]
    return [f"layer {layer.name} lacks {path}" for path in needed if not (layer / path).is_file()]


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def stale_files(build: Build, core_source: Path = ROOT / "layers/gc_core/session_gc") -> list[str]:
    """Source files whose built copy is missing or different (empty: the build is current)."""
    pairs = [(core_source, layer / "python/session_gc") for layer in build.layers.values()]
    pairs += [(f.source, f.built) for f in build.functions.values()]
    stale = []
    for source, built in pairs:
        source_tree = _tree(source)
        built_tree = _tree(built) if built.is_dir() else {}
        for relative in sorted(source_tree.keys() | built_tree.keys()):
            if built_tree.get(relative) != source_tree.get(relative):
                stale.append(str(source / relative))
    return stale


def extension_modules(layer: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every compiled module under the layer's python/."""
    python = layer / "python"
    found = {}
    for path in sorted(python.rglob("*.so")):
        relative = path.relative_to(python)
        stem = relative.name.split(".", 1)[0]
        found[".".join([*relative.parent.parts, stem])] = path
    return found


def deferred_imports(layer: Path) -> list[str]:
    """Import statements the core runs inside functions (on first use, not at cold start).

    The operator CLI (cli.py) is left out: Lambda never runs it, and its extras are dev-only.
    """
    statements: set[str] = set()
    for path in sorted((layer / "python" / "session_gc").rglob("*.py")):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                statements.update(
                    ast.unparse(inner)
                    for inner in ast.walk(node)
                    if isinstance(inner, ast.Import | ast.ImportFrom)
                    and not getattr(inner, "level", 0)
                )
    return sorted(statements)


def _elf_machine(path: Path) -> int | None:
    header = path.read_bytes()[:20]
    if header[:4] != b"\x7fELF":
        return None
    return int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")


def extension_problems(layer: Path, architecture: str) -> list[str]:
    """Compiled modules built for another machine or another Python than the functions'."""
    machine, tag = ELF_MACHINE[architecture], EXTENSION_TAG[architecture]
    problems = []
    for name, path in extension_modules(layer).items():
        if _elf_machine(path) != machine:
            problems.append(f"{name} ({path.name}) is not an {architecture} ELF object")
        elif not (path.name.endswith(f".cpython-313-{tag}.so") or path.name.endswith(".abi3.so")):
            problems.append(f"{name} ({path.name}) is not built for CPython 3.13 on {tag}")
    return problems


def find_python(explicit: str | None = None) -> str:
    """The real path of a python3.13 interpreter (pyenv shims resolved, so env can be bare)."""
    pyenv_root = Path(os.environ.get("PYENV_ROOT", "~/.pyenv")).expanduser()
    candidates = [
        explicit,
        os.environ.get("SAM_CHECK_PYTHON"),
        shutil.which(RUNTIME),
        # pyenv's shim answers only where 3.13 is the selected version; the binary always does.
        *map(str, sorted(pyenv_root.glob(f"versions/3.13*/bin/{RUNTIME}"))),
    ]
    for candidate in filter(None, candidates):
        try:
            reply = subprocess.run(  # noqa: S603 - our own interpreter, fixed arguments
                [candidate, "-c", "import sys; print(sys.executable, *sys.version_info[:2])"],
                capture_output=True,
                text=True,
                check=True,
                timeout=IMPORT_TIMEOUT_S,
            ).stdout.split()
        except (OSError, subprocess.SubprocessError):
            continue
        if reply[1:] == ["3", "13"]:
            return reply[0]
    raise LookupError(
        f"no {RUNTIME} interpreter found (tried {[c for c in candidates if c]}); "
        "set SAM_CHECK_PYTHON to one"
    )


def import_problems(build: Build, function: Function, python: str) -> tuple[list[str], list[str]]:
    """Import the handler in a bare python3.13; returns (problems, notes)."""
    module, _, attribute = function.handler.rpartition(".")
    layers = [build.layers[name] for name in function.layers if name in build.layers]
    compiled = sorted(name for layer in layers for name in extension_modules(layer))
    same_machine = HOST_ARCH.get(platform.machine()) == function.architecture
    request = {
        # Lambda's order: the function's own folder (/var/task), then the layers (/opt/python).
        "path": [str(function.built), *(str(layer / "python") for layer in layers)],
        "module": module,
        "function": attribute,
        "deferred": sorted({name for layer in layers for name in deferred_imports(layer)}),
        "extensions": compiled if same_machine else [],
    }
    completed = subprocess.run(  # noqa: S603 - our own interpreter, fixed arguments
        [python, "-I", "-S", "-c", BOOTSTRAP, json.dumps(request)],
        capture_output=True,
        text=True,
        env=IMPORT_ENV,
        cwd=function.built,
        timeout=IMPORT_TIMEOUT_S,
        check=False,
    )
    label = f"{function.name} ({function.handler})"
    try:
        reply = json.loads(completed.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return [f"{label}: the import check itself failed: {completed.stderr.strip()}"], []
    problems = []
    if reply["version"] != [3, 13]:
        problems.append(f"{label}: ran on Python {reply['version']}, not 3.13")
    if "error" in reply:
        problems.append(f"{label}: import failed: {reply['error']}")
    elif not reply["handler"]:
        problems.append(f"{label}: module {module!r} has no callable {attribute!r}")
    problems += [
        f"{label}: {statement!r} (run on first use) fails: {error}"
        for statement, error in reply["deferred"].items()
    ]
    problems += [f"{label}: opened the network at import: {call}" for call in reply["network"]]
    problems += [
        f"{label}: compiled module {name} does not load: {error}"
        for name, error in reply["extensions"].items()
        if error
    ]
    notes = []
    if compiled and not same_machine:
        notes.append(
            f"{label}: compiled modules {', '.join(compiled)} are {function.architecture} and "
            f"cannot load on this {platform.machine()} host; the import ran without them "
            "(their importers fall back to pure Python)"
        )
    return problems, notes


def check(build_dir: Path = BUILD_DIR, python: str | None = None) -> tuple[list[str], list[str]]:
    """Every check above on one build; returns (problems, notes)."""
    build = load_build(build_dir)
    problems: list[str] = []
    notes: list[str] = []
    if not build.layers or not build.functions:
        return [f"{build_dir}: the built template has no layer or no function"], notes
    for layer in build.layers.values():
        problems += layer_problems(layer)
    for architecture in sorted({f.architecture for f in build.functions.values()}):
        for layer in build.layers.values():
            problems += extension_problems(layer, architecture)
    problems += [f"stale build: {path} differs from its built copy" for path in stale_files(build)]
    interpreter = find_python(python)
    for function in build.functions.values():
        found, said = import_problems(build, function, interpreter)
        problems += found
        notes += said
    return problems, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build-dir", type=Path, default=BUILD_DIR)
    parser.add_argument("--python", help=f"a {RUNTIME} interpreter (default: found on PATH)")
    args = parser.parse_args(argv)
    problems, notes = check(args.build_dir, args.python)
    for note in notes:
        sys.stdout.write(f"note: {note}\n")
    for problem in problems:
        sys.stdout.write(f"FAILED: {problem}\n")
    if not problems:
        sys.stdout.write(f"sam build check passed: {args.build_dir}\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
