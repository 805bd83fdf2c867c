"""Pipeline specs: YAML → validated ``Pipeline``, and rendering a stage's input.

A pipeline has declared ``inputs`` and named ``stages``; a stage has a ``model``,
an ``input`` mapping, and optional ``needs``, ``retry``, ``timeout`` and ``cache``; the pipeline
may set a ``deadline`` (seconds a run may take) and a ``budget_usd``. Values may
reference ``${inputs.NAME}`` and ``${stages.NAME.outputs[N]}``; a stage reference
implies a dependency. Every problem is reported as ``SpecError`` naming the file,
stage, field and rule, before anything is submitted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipelines.catalog import ModelSpec, ParamSpec, check_value, get_model
from pipelines.checks import ALL_CHECKS, parse_checks
from pipelines.errors import PipelineTooLargeError, SpecError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_REF = re.compile(r"\$\{([^}]*)\}")
_INPUT_REF = re.compile(r"^\s*inputs\.([A-Za-z_][A-Za-z0-9_-]*)\s*$")
_STAGE_REF = re.compile(r"^\s*stages\.([A-Za-z_][A-Za-z0-9_-]*)\.outputs\[(\d+)\]\s*$")
InputType = Literal["string", "integer", "number", "boolean"]
_INPUT_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
}
# A stand-in for an upstream output while checking a stage before it can run.
PLACEHOLDER_URL = "https://outputs.invalid/placeholder"


@dataclass(frozen=True, slots=True)
class InputDecl:
    type: InputType = "string"
    required: bool = False
    default: Any = None
    description: str = ""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 1
    backoff_s: float = 5.0


@dataclass(frozen=True, slots=True)
class StageSpec:
    name: str
    model: str
    input: Mapping[str, Any]
    needs: tuple[str, ...]
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_s: float | None = None
    #: Serve from the result cache (pipelines/cache.py); None: the global RESULT_CACHE.
    cache: bool | None = None
    #: The quality gates its outputs must pass (pipelines/checks.py): all by default.
    checks: frozenset[str] = ALL_CHECKS


@dataclass(frozen=True, slots=True)
class Limits:
    """How big a pipeline may be: parsing and the state machine stay fast and bounded."""

    max_stages: int = 100
    #: Bytes of an inline spec as JSON (a request body's ``pipeline``).
    max_spec_bytes: int = 256 * 1024
    #: Nesting of objects and lists in a spec or a request body.
    max_depth: int = 32


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Pipeline:
    name: str
    stages: Mapping[str, StageSpec]
    inputs: Mapping[str, InputDecl]
    description: str = ""
    #: Seconds a run may take before what still runs is cancelled (and deleted).
    deadline_s: float | None = None
    #: What one run may spend, in USD (checked before each submit).
    budget_usd: float | None = None
    source: dict[str, Any] = field(default_factory=dict, compare=False)
    #: A topological order (each level's stages sorted by name), and each stage's direct
    #: dependents: computed once, in linear time, when the spec is parsed.
    topological: tuple[str, ...] = field(default=(), compare=False)
    dependents: Mapping[str, tuple[str, ...]] = field(default_factory=dict, compare=False)

    def order(self) -> tuple[str, ...]:
        """Stages in a topological order (validated acyclic)."""
        return self.topological or _topological(self.stages)[0]

    def downstream(self, stage: str) -> set[str]:
        """Every stage that depends on ``stage``, directly or not."""
        children = self.dependents or _dependents(self.stages)
        found: set[str] = set()
        frontier = [stage]
        while frontier:
            for name in children.get(frontier.pop(), ()):
                if name not in found:
                    found.add(name)
                    frontier.append(name)
        return found


def _dependents(stages: Mapping[str, StageSpec]) -> dict[str, tuple[str, ...]]:
    children: dict[str, list[str]] = {name: [] for name in stages}
    for name, stage in stages.items():
        for need in stage.needs:
            if need in children:
                children[need].append(name)
    return {name: tuple(sorted(c)) for name, c in children.items()}


def _topological(stages: Mapping[str, StageSpec]) -> tuple[tuple[str, ...], list[str]]:
    """(an order of the stages, level by level, each level sorted; the stages left over,
    which sit on or behind a cycle). Kahn's algorithm: linear in stages and needs."""
    children = _dependents(stages)
    waiting = {name: sum(n in stages for n in s.needs) for name, s in stages.items()}
    level = sorted(name for name, count in waiting.items() if count == 0)
    order: list[str] = []
    while level:
        order.extend(level)
        following: list[str] = []
        for name in level:
            for child in children[name]:
                waiting[child] -= 1
                if waiting[child] == 0:
                    following.append(child)
        level = sorted(following)
    placed = set(order)
    return tuple(order), sorted(n for n in stages if n not in placed)


def depth(value: Any, limit: int) -> int:
    """How deeply ``value`` nests lists and mappings, counted up to ``limit + 1`` (no
    recursion: a hostile body cannot exhaust the stack)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if not isinstance(item, Mapping | list | tuple):
            continue
        deepest = max(deepest, level)
        if deepest > limit:
            return deepest
        children = item.values() if isinstance(item, Mapping) else item
        stack.extend((child, level + 1) for child in children)
    return deepest


class _Problems:
    def __init__(self, where: str) -> None:
        self.where = where
        self.items: list[str] = []

    def add(self, stage: str | None, fieldname: str, rule: str) -> None:
        at = f"stage '{stage}': " if stage else ""
        self.items.append(f"{self.where}: {at}{fieldname}: {rule}")

    def raise_if_any(self) -> None:
        if self.items:
            raise SpecError("\n".join(self.items))


def load_file(path: str | Path) -> Pipeline:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror}") from exc
    return parse_text(text, where=str(path), default_name=path.stem)


def parse_text(
    text: str, *, where: str, default_name: str = "pipeline", limits: Limits = DEFAULT_LIMITS
) -> Pipeline:
    try:
        doc = yaml.safe_load(text)
    except RecursionError:
        raise SpecError(f"{where}: nested more than {limits.max_depth} levels deep") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{where}: invalid YAML{at}: {getattr(exc, 'problem', exc)}") from exc
    return parse(doc, where=where, default_name=default_name, limits=limits)


def parse(
    doc: Any, *, where: str, default_name: str = "pipeline", limits: Limits = DEFAULT_LIMITS
) -> Pipeline:
    """Validate a decoded spec completely, collecting every problem before raising."""
    problems = _Problems(where)
    if not isinstance(doc, Mapping):
        raise SpecError(f"{where}: a pipeline must be a mapping with 'stages'")
    if depth(doc, limits.max_depth) > limits.max_depth:
        raise SpecError(f"{where}: nested more than {limits.max_depth} levels deep")
    raw_stages = doc.get("stages")
    if isinstance(raw_stages, Mapping) and len(raw_stages) > limits.max_stages:
        raise PipelineTooLargeError(
            f"{where}: stages: {len(raw_stages)} stages, over the limit of {limits.max_stages} "
            "(MAX_PIPELINE_STAGES)"
        )
    top = ("name", "description", "inputs", "stages", "deadline", "budget_usd")
    for key in doc:
        if key not in top:
            problems.add(None, str(key), f"unknown key (expected {', '.join(top)})")
    name = doc.get("name", default_name)
    if not isinstance(name, str) or not _NAME.match(name):
        problems.add(None, "name", "must be a short identifier")
        name = default_name
    inputs = _parse_inputs(doc.get("inputs") or {}, problems)
    if not isinstance(raw_stages, Mapping) or not raw_stages:
        problems.add(None, "stages", "must be a non-empty mapping of stage name to stage")
        problems.raise_if_any()
        raise AssertionError  # unreachable: raise_if_any raised
    stages = {}
    for stage_name, raw in raw_stages.items():
        stage = _parse_stage(str(stage_name), raw, inputs, raw_stages, problems)
        if stage is not None:
            stages[stage.name] = stage
    order, cyclic = _topological(stages)
    if cyclic:
        _report_cycle(stages, cyclic, problems)
    deadline_s = _checked(doc.get("deadline"), "deadline", deadline_rule, problems)
    budget_usd = _checked(doc.get("budget_usd"), "budget_usd", budget_rule, problems)
    problems.raise_if_any()
    return Pipeline(
        name=name,
        stages=stages,
        inputs=inputs,
        description=str(doc.get("description", "")),
        deadline_s=deadline_s,
        budget_usd=budget_usd,
        source=dict(doc),
        topological=order,
        dependents=_dependents(stages),
    )


def _parse_inputs(raw: Any, problems: _Problems) -> dict[str, InputDecl]:
    if not isinstance(raw, Mapping):
        problems.add(None, "inputs", "must be a mapping of input name to declaration")
        return {}
    out: dict[str, InputDecl] = {}
    for name, decl in raw.items():
        where = f"inputs.{name}"
        if not isinstance(name, str) or not _NAME.match(name):
            problems.add(None, where, "input names must be short identifiers")
            continue
        if isinstance(decl, str) and decl in _INPUT_TYPES:
            decl = {"type": decl}
        if not isinstance(decl, Mapping):
            problems.add(None, where, "must be a type name or a mapping {type, required, default}")
            continue
        unknown = set(decl) - {"type", "required", "default", "description"}
        if unknown:
            problems.add(None, where, f"unknown keys {sorted(unknown)}")
        kind = decl.get("type", "string")
        if kind not in _INPUT_TYPES:
            problems.add(None, f"{where}.type", f"must be one of {', '.join(_INPUT_TYPES)}")
            continue
        default = decl.get("default")
        if default is not None and not _is_type(default, kind):
            problems.add(None, f"{where}.default", f"must be a {kind}")
        out[name] = InputDecl(
            type=kind,
            required=bool(decl.get("required", default is None)),
            default=default,
            description=str(decl.get("description", "")),
        )
    return out


def _is_type(value: Any, kind: str) -> bool:
    if kind != "boolean" and isinstance(value, bool):
        return False
    return isinstance(value, _INPUT_TYPES[kind])


def _parse_stage(
    name: str,
    raw: Any,
    inputs: Mapping[str, InputDecl],
    all_stages: Mapping[str, Any],
    problems: _Problems,
) -> StageSpec | None:
    if not _NAME.match(name):
        problems.add(name, "name", "stage names must be short identifiers")
        return None
    if not isinstance(raw, Mapping):
        problems.add(name, "stage", "must be a mapping with model and input")
        return None
    for key in raw:
        if key not in _STAGE_KEYS:
            problems.add(name, str(key), f"unknown key (expected {', '.join(_STAGE_KEYS)})")
    model = get_model(str(raw.get("model")))
    if model is None:
        problems.add(name, "model", f"unknown model {raw.get('model')!r}")
        return None
    params = raw.get("input") or {}
    if not isinstance(params, Mapping):
        problems.add(name, "input", "must be a mapping of parameter to value")
        return None
    needs = set(_as_list(raw.get("needs"), name, problems))
    for param_name, value in params.items():
        spec = model.params.get(param_name)
        if spec is None:
            problems.add(
                name,
                f"input.{param_name}",
                f"unknown parameter for {model.id} (known: {', '.join(model.params)})",
            )
            continue
        needs |= _check_param(name, param_name, spec, value, inputs, all_stages, problems)
    for param_name, spec in model.params.items():
        if spec.required and param_name not in params:
            problems.add(name, f"input.{param_name}", f"is required by {model.id}")
    for need in needs:
        if need not in all_stages:
            problems.add(name, "needs", f"unknown stage {need!r}")
        elif need == name:
            problems.add(name, "needs", "a stage cannot depend on itself")
    return StageSpec(
        name=name,
        model=model.id,
        input=dict(params),
        needs=tuple(sorted(needs)),
        retry=_parse_retry(raw.get("retry"), name, problems),
        timeout_s=_parse_timeout(raw.get("timeout"), name, problems),
        cache=_parse_cache(raw.get("cache"), name, problems),
        checks=_parse_checks(raw.get("checks"), name, problems),
    )


_STAGE_KEYS = ("model", "input", "needs", "retry", "timeout", "cache", "checks")


def _parse_checks(raw: Any, stage: str, problems: _Problems) -> frozenset[str]:
    try:
        return parse_checks(raw)
    except ValueError as exc:
        problems.add(stage, "checks", str(exc))
        return ALL_CHECKS


def _parse_cache(raw: Any, stage: str, problems: _Problems) -> bool | None:
    if raw is None or isinstance(raw, bool):
        return raw
    problems.add(stage, "cache", f"must be true or false, got {raw!r}")
    return None


def _as_list(raw: Any, stage: str, problems: _Problems) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, Sequence) and all(isinstance(x, str) for x in raw):
        return list(raw)
    problems.add(stage, "needs", "must be a stage name or a list of stage names")
    return []


def _check_param(
    stage: str,
    param: str,
    spec: ParamSpec,
    value: Any,
    inputs: Mapping[str, InputDecl],
    all_stages: Mapping[str, Any],
    problems: _Problems,
) -> set[str]:
    """Check one parameter; return the stages it references."""
    where = f"input.{param}"
    refs = _REF.findall(value) if isinstance(value, str) else []
    if not refs:
        if (rule := check_value(spec, value)) is not None:
            problems.add(stage, where, rule)
        return set()
    whole = isinstance(value, str) and _REF.fullmatch(value.strip()) is not None
    needs: set[str] = set()
    for ref in refs:
        if m := _INPUT_REF.match(ref):
            decl = inputs.get(m[1])
            if decl is None:
                problems.add(stage, where, f"references undeclared input '{m[1]}'")
            elif whole and not _input_fits(decl.type, spec):
                problems.add(
                    stage, where, f"input '{m[1]}' is a {decl.type}; {param} takes {spec.type}"
                )
        elif m := _STAGE_REF.match(ref):
            needs.add(m[1])
            _check_stage_ref(stage, where, spec, m[1], int(m[2]), whole, all_stages, problems)
        else:
            problems.add(
                stage,
                where,
                f"unknown reference ${{{ref}}} "
                "(use ${inputs.NAME} or ${stages.NAME.outputs[N]})",
            )
    if not whole and spec.type not in ("string", "url"):
        problems.add(
            stage, where, f"a reference inside text makes a string; {param} takes {spec.type}"
        )
    return needs


def _input_fits(kind: str, spec: ParamSpec) -> bool:
    if spec.type in ("string", "size", "url", "image_size"):
        return kind == "string"
    if spec.type == "number":
        return kind in ("integer", "number")
    return kind == spec.type


def _check_stage_ref(
    stage: str,
    where: str,
    spec: ParamSpec,
    target: str,
    index: int,
    whole: bool,
    all_stages: Mapping[str, Any],
    problems: _Problems,
) -> None:
    raw = all_stages.get(target)
    model = get_model(str(raw.get("model"))) if isinstance(raw, Mapping) else None
    if raw is None:
        problems.add(stage, where, f"references unknown stage '{target}'")
        return
    if model is None:
        return  # the target's own entry reports its bad model
    limit = _output_count(model, raw)
    if index >= limit:
        problems.add(
            stage,
            where,
            f"stage '{target}' ({model.id}) has {limit} output(s); outputs[{index}] does not exist",
        )
    if whole and spec.type != "url" and spec.type != "string":
        problems.add(stage, where, f"stage outputs are URLs; this parameter takes {spec.type}")
    if spec.accepts is not None and model.output != spec.accepts:
        problems.add(
            stage,
            where,
            f"takes an {spec.accepts}, but stage '{target}' ({model.id}) outputs a {model.output}",
        )


def _output_count(model: ModelSpec, raw: Mapping[str, Any]) -> int:
    if model.count_param is not None:
        count = (raw.get("input") or {}).get(model.count_param)
        if isinstance(count, int) and not isinstance(count, bool):
            return max(1, min(count, model.max_outputs))
        return 1 if count is None else model.max_outputs
    return model.max_outputs


def _parse_retry(raw: Any, stage: str, problems: _Problems) -> RetryPolicy:
    if raw is None:
        return RetryPolicy()
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = {"attempts": raw}
    if not isinstance(raw, Mapping) or set(raw) - {"attempts", "backoff"}:
        problems.add(stage, "retry", "must be a mapping {attempts, backoff}")
        return RetryPolicy()
    attempts, backoff = raw.get("attempts", 1), raw.get("backoff", 5)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 10:
        problems.add(stage, "retry.attempts", "must be an integer in range 1..10")
        attempts = 1
    if (
        isinstance(backoff, bool)
        or not isinstance(backoff, int | float)
        or not 0 <= backoff <= 3600
    ):
        problems.add(stage, "retry.backoff", "must be seconds in range 0..3600")
        backoff = 5
    return RetryPolicy(attempts=attempts, backoff_s=float(backoff))


def _parse_timeout(raw: Any, stage: str, problems: _Problems) -> float | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 1 <= raw <= 7 * 86400:
        problems.add(stage, "timeout", "must be seconds in range 1..604800")
        return None
    return float(raw)


MAX_DEADLINE_S = 30 * 86400


def deadline_rule(value: Any) -> str | None:
    """Why ``value`` is not a run deadline in seconds, or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be seconds (a number), got {value!r}"
    if not 1 <= value <= MAX_DEADLINE_S:
        return f"must be seconds in range 1..{MAX_DEADLINE_S}, got {value}"
    return None


def budget_rule(value: Any) -> str | None:
    """Why ``value`` is not a budget in USD, or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a number of USD, got {value!r}"
    if not 0 <= value <= 1_000_000:
        return f"must be in range 0..1000000 USD, got {value}"
    return None


def _checked(
    raw: Any, name: str, rule: Callable[[Any], str | None], problems: _Problems
) -> float | None:
    if raw is None:
        return None
    if (why := rule(raw)) is not None:
        problems.add(None, name, why)
        return None
    return float(raw)


def _report_cycle(
    stages: Mapping[str, StageSpec], cyclic: Sequence[str], problems: _Problems
) -> None:
    """Name one cycle among the stages Kahn's algorithm could not place: walk needs from
    the first of them (each has an unplaced need) until a stage repeats."""
    left = set(cyclic)
    path: list[str] = [cyclic[0]]
    seen = {cyclic[0]: 0}
    while True:
        current = path[-1]
        need = next(n for n in stages[current].needs if n in left)
        if need in seen:
            cycle = [*path[seen[need] :], need]
            problems.add(cycle[0], "needs", f"cycle: {' -> '.join(cycle)}")
            return
        seen[need] = len(path)
        path.append(need)


# Run-time ----------------------------------------------------------------------------


def bind_inputs(
    pipeline: Pipeline, given: Mapping[str, Any], *, where: str = "run"
) -> dict[str, Any]:
    """Check run inputs against the declarations; fill defaults. Raises SpecError."""
    problems = _Problems(where)
    for name in given:
        if name not in pipeline.inputs:
            problems.add(None, f"inputs.{name}", f"not declared by pipeline '{pipeline.name}'")
    bound: dict[str, Any] = {}
    for name, decl in pipeline.inputs.items():
        if name in given:
            value = given[name]
            if not _is_type(value, decl.type):
                article = "an" if decl.type == "integer" else "a"
                problems.add(
                    None, f"inputs.{name}", f"must be {article} {decl.type}, got {value!r}"
                )
            bound[name] = value
        elif decl.default is not None:
            bound[name] = decl.default
        elif decl.required:
            problems.add(None, f"inputs.{name}", "is required")
    problems.raise_if_any()
    # Every stage must be valid with these inputs before anything is submitted.
    for stage in pipeline.stages.values():
        render(stage, bound, {}, where=where, placeholders=True)
    return bound


def render(
    stage: StageSpec,
    inputs: Mapping[str, Any],
    outputs: Mapping[str, Sequence[str]],
    *,
    where: str = "run",
    placeholders: bool = False,
    validate: bool = True,
) -> dict[str, Any]:
    """The request body for ``stage``: references resolved, defaults left to the provider.

    With ``placeholders`` an upstream output that does not exist yet becomes a dummy
    URL, so a stage can be checked before its upstream has run. Without ``validate`` the
    values are not checked against the model (a record of what was sent, with upstream
    outputs named by their s3:// copies).
    """
    problems = _Problems(where)

    def resolve(ref: str) -> Any:
        if m := _INPUT_REF.match(ref):
            return inputs[m[1]]
        m = _STAGE_REF.match(ref)
        if m is None:
            raise SpecError(f"{where}: stage '{stage.name}': bad reference {ref!r}")
        produced = outputs.get(m[1])
        if produced is None:
            if placeholders:
                return PLACEHOLDER_URL
            raise SpecError(f"{where}: stage '{stage.name}': stage '{m[1]}' has no outputs yet")
        index = int(m[2])
        if index >= len(produced):
            raise SpecError(
                f"{where}: stage '{stage.name}': stage '{m[1]}' produced {len(produced)} "
                f"output(s), outputs[{index}] does not exist"
            )
        return produced[index]

    model = get_model(stage.model)
    if model is None:
        raise SpecError(f"{where}: stage '{stage.name}': unknown model {stage.model!r}")
    body: dict[str, Any] = {}
    for param, value in stage.input.items():
        if isinstance(value, str) and (whole := _REF.fullmatch(value.strip())):
            value = resolve(whole[1])
        elif isinstance(value, str):
            value = _REF.sub(lambda m: str(resolve(m[1])), value)
        if validate and (rule := check_value(model.params[param], value)) is not None:
            problems.add(stage.name, f"input.{param}", rule)
        body[param] = value
    problems.raise_if_any()
    return body
