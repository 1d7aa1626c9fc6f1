"""Run the real Lambda handlers in-process, as Lambda would: module loaded from its folder,
called with a real-shaped event and a context object."""

from __future__ import annotations

import importlib.util
import itertools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[2]
HANDLERS = ("collect", "sweep", "full_gc")
_loads = itertools.count()


@dataclass
class LambdaContext:
    """The attributes of Lambda's context object that Powertools and the handlers read."""

    function_name: str = "session-gc-local"
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = "arn:aws:lambda:eu-west-1:123456789012:function:session-gc-local"
    aws_request_id: str = "local-request"
    timeout_s: float = 900.0
    _started: float = field(default_factory=time.monotonic)

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.timeout_s - (time.monotonic() - self._started)) * 1000))


def load_handler(name: str, root: Path = REPO_ROOT) -> ModuleType:
    """Import ``functions/{name}/app.py`` afresh, as a cold start does (settings read now)."""
    if name not in HANDLERS:
        raise ValueError(f"unknown handler {name!r}; expected one of {HANDLERS}")
    path = root / "functions" / name / "app.py"
    module_name = f"session_gc_handler_{name}_{next(_loads)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load handler from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module
