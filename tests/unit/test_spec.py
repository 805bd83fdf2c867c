"""Pipeline specs: every rejection names the file, stage, field and rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipelines import spec as specs
from pipelines.catalog import MODELS
from pipelines.errors import SpecError

IMG = "wavespeed-ai/hunyuan-image-2.1"
I2V = "wavespeed-ai/hunyuan-video/i2v"
T2V = "wavespeed-ai/hunyuan-video/t2v"
MESH = "wavespeed-ai/hunyuan3d/v2.1"
AIML = "hunyuan/hunyuan-image-v3-text-to-image"
EXAMPLES = sorted((Path(specs.__file__).parent / "examples").glob("*.yaml"))


def parse(stages: dict[str, Any], inputs: dict[str, Any] | None = None) -> specs.Pipeline:
    return specs.parse({"inputs": inputs or {}, "stages": stages}, where="p.yaml")


def rejects(stages: dict[str, Any], *fragments: str, inputs: dict[str, Any] | None = None) -> str:
    with pytest.raises(SpecError) as exc:
        parse(stages, inputs)
    message = str(exc.value)
    assert message.startswith("p.yaml: ")
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid_with_defaults(path: Path) -> None:
    """Every bundled example validates and binds with its default inputs."""
    pipeline = specs.load_file(path)
    specs.bind_inputs(pipeline, {})


def test_examples_cover_required_shapes() -> None:
    """image_video_3d fans out from one image; some example uses t2v and Hunyuan Image 3."""
    p = specs.load_file(Path(specs.__file__).parent / "examples" / "image_video_3d.yaml")
    assert {n: s.needs for n, s in p.stages.items()} == {
        "image": (), "video": ("image",), "mesh": ("image",)
    }  # fmt: skip
    models = {s.model for e in EXAMPLES for s in specs.load_file(e).stages.values()}
    assert models == set(MODELS)


def test_reference_implies_dependency() -> None:
    """${stages.X.outputs[0]} adds X to needs."""
    p = parse({"a": {"model": IMG, "input": {"prompt": "x"}},
               "b": {"model": MESH, "input": {"image": "${stages.a.outputs[0]}"}}})  # fmt: skip
    assert p.stages["b"].needs == ("a",)


def test_unknown_model() -> None:
    """An unknown model is named."""
    rejects({"a": {"model": "acme/m", "input": {}}}, "stage 'a': model: unknown model 'acme/m'")


def test_unknown_parameter() -> None:
    """A parameter the model does not take is named with the known ones."""
    rejects({"a": {"model": IMG, "input": {"prompt": "x", "colour": "red"}}},
            "stage 'a': input.colour: unknown parameter", "known: prompt")  # fmt: skip


def test_missing_required() -> None:
    """A missing required parameter is named."""
    rejects({"a": {"model": I2V, "input": {}}}, "stage 'a': input.image: is required")


@pytest.mark.parametrize(
    ("model", "param", "value", "rule"),
    [
        (IMG, "size", "2000*512", "256..1536"),
        (IMG, "seed", -5, "-1..2147483647"),
        (IMG, "output_format", "gif", "jpeg, png, webp"),
        (IMG, "enable_base64_output", True, "webhook callbacks do not support base64"),
        (I2V, "duration", 11, "5..10"),
        (I2V, "num_inference_steps", 0, "1..30"),
        (I2V, "size", "1024*1024", "1280*720, 720*1280"),
        (T2V, "num_inference_steps", 1, "2..30"),
        (AIML, "num_images", 5, "1..4"),
        (AIML, "guidance_scale", 30, "1..20"),
        (AIML, "image_size", "huge", "square_hd"),
        (AIML, "prompt", "x" * 4001, "at most 4000"),
    ],
)
def test_out_of_range(model: str, param: str, value: Any, rule: str) -> None:
    """Each range and enum rule of the catalog is enforced with its rule in the message."""
    base = {"prompt": "x"} if model in (IMG, T2V, AIML) else {"image": "https://h/x.png"}
    rejects({"a": {"model": model, "input": {**base, param: value}}}, f"input.{param}", rule)


def test_cycle() -> None:
    """A cycle is reported with its path."""
    rejects(
        {"a": {"model": MESH, "input": {"image": "${stages.b.outputs[0]}"}},
         "b": {"model": IMG, "input": {"prompt": "x"}, "needs": ["a"]}},
        "cycle: a -> b -> a",
    )  # fmt: skip


def test_reference_to_missing_stage() -> None:
    """A reference to a stage that does not exist is named."""
    rejects({"a": {"model": MESH, "input": {"image": "${stages.zz.outputs[0]}"}}},
            "references unknown stage 'zz'")  # fmt: skip


def test_mesh_is_not_an_image() -> None:
    """A parameter that takes an image refuses a stage that outputs a mesh."""
    rejects(
        {"m": {"model": MESH, "input": {"image": "https://h/x.png"}},
         "v": {"model": I2V, "input": {"image": "${stages.m.outputs[0]}"}}},
        "stage 'v': input.image: takes an image, but stage 'm'", "outputs a mesh",
    )  # fmt: skip


def test_output_index_out_of_range() -> None:
    """outputs[N] past what the model returns is refused."""
    rejects(
        {"a": {"model": IMG, "input": {"prompt": "x"}},
         "b": {"model": MESH, "input": {"image": "${stages.a.outputs[1]}"}}},
        "has 1 output(s); outputs[1] does not exist",
    )  # fmt: skip


def test_typed_param_from_output_url() -> None:
    """An integer parameter cannot take an output URL."""
    rejects({"a": {"model": IMG, "input": {"prompt": "x"}},
             "b": {"model": T2V, "input": {"prompt": "x", "seed": "${stages.a.outputs[0]}"}}},
            "input.seed", "takes integer")  # fmt: skip


def test_undeclared_and_mistyped_inputs() -> None:
    """Inputs must be declared, and their type must fit the parameter."""
    rejects({"a": {"model": IMG, "input": {"prompt": "${inputs.p}"}}}, "undeclared input 'p'")
    rejects({"a": {"model": IMG, "input": {"prompt": "x", "seed": "${inputs.s}"}}},
            "input 's' is a string; seed takes integer", inputs={"s": "string"})  # fmt: skip


def test_unknown_reference_syntax() -> None:
    """Anything but inputs.NAME or stages.NAME.outputs[N] is refused."""
    rejects(
        {"a": {"model": IMG, "input": {"prompt": "${env.HOME}"}}}, "unknown reference ${env.HOME}"
    )


def test_all_problems_reported_at_once() -> None:
    """Validation collects every problem instead of stopping at the first."""
    message = rejects({"a": {"model": IMG, "input": {"size": "1*1"}},
                       "b": {"model": "nope"}}, "stage 'a'", "stage 'b'")  # fmt: skip
    assert message.count("\n") >= 2


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("stages: [", "invalid YAML at line 1"),
        ("- a\n- b", "must be a mapping"),
        ("stages: {}", "stages: must be a non-empty mapping"),
        ("stages: {a: {model: x}}\nextra: 1", "extra: unknown key"),
    ],
)
def test_file_level_errors(tmp_path: Path, text: str, fragment: str) -> None:
    """Malformed files are refused naming the file."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as exc:
        specs.load_file(path)
    assert str(exc.value).startswith(str(path)) and fragment in str(exc.value)


def test_retry_and_timeout_rules() -> None:
    """retry and timeout are range-checked."""
    rejects({"a": {"model": IMG, "input": {"prompt": "x"}, "retry": {"attempts": 0}}},
            "retry.attempts: must be an integer in range 1..10")  # fmt: skip
    rejects({"a": {"model": IMG, "input": {"prompt": "x"}, "timeout": -1}}, "timeout")


def test_bind_inputs_checks_values_against_catalog() -> None:
    """Run inputs are type-checked, and the rendered parameters range-checked, before a run."""
    p = parse({"a": {"model": IMG, "input": {"prompt": "${inputs.p}", "seed": "${inputs.s}"}}},
              inputs={"p": "string", "s": {"type": "integer", "default": 1}})  # fmt: skip
    assert specs.bind_inputs(p, {"p": "x"}) == {"p": "x", "s": 1}
    with pytest.raises(SpecError, match=r"inputs\.p: is required"):
        specs.bind_inputs(p, {})
    with pytest.raises(SpecError, match=r"inputs\.s: must be an integer"):
        specs.bind_inputs(p, {"p": "x", "s": "7"})
    with pytest.raises(SpecError, match=r"inputs\.zz: not declared"):
        specs.bind_inputs(p, {"p": "x", "zz": 1})
    with pytest.raises(SpecError, match=r"input\.seed: must be in range -1\.\.2147483647"):
        specs.bind_inputs(p, {"p": "x", "s": -9})


def test_render_resolves_references() -> None:
    """Whole references keep their type; references inside text are interpolated."""
    p = parse(
        {"a": {"model": IMG, "input": {"prompt": "x"}},
         "b": {"model": I2V, "input": {"image": "${stages.a.outputs[0]}",
                                       "prompt": "of ${inputs.p}", "seed": "${inputs.s}"}}},
        inputs={"p": "string", "s": "integer"},
    )  # fmt: skip
    body = specs.render(p.stages["b"], {"p": "cats", "s": 3}, {"a": ["https://h/a.png"]})
    assert body == {"image": "https://h/a.png", "prompt": "of cats", "seed": 3}


def test_render_refuses_non_url_output() -> None:
    """An upstream output that is not a URL is caught before submitting."""
    p = parse({"a": {"model": IMG, "input": {"prompt": "x"}},
               "b": {"model": MESH, "input": {"image": "${stages.a.outputs[0]}"}}})  # fmt: skip
    with pytest.raises(SpecError, match="must be an http"):
        specs.render(p.stages["b"], {}, {"a": ["data-not-a-url"]})


def _chain(n: int) -> dict[str, Any]:
    """A chain of ``n`` stages named so that each depends on the one named after it
    (s_00000 needs s_00001 ...): the worst case for ordering by name."""
    stages: dict[str, Any] = {}
    for i in range(n):
        stage: dict[str, Any] = {"model": IMG, "input": {"prompt": "x"}}
        if i < n - 1:
            stage["needs"] = [f"s_{i + 1:05d}"]
        stages[f"s_{i:05d}"] = stage
    return {"stages": stages}


def test_a_long_chain_named_in_reverse_orders_without_recursion() -> None:
    """5,000 stages in a chain, named against their order: parsed (no RecursionError),
    ordered from the last name to the first, and each stage's downstream found."""
    pipeline = specs.parse(_chain(5000), where="c", limits=specs.Limits(max_stages=10_000))
    order = pipeline.order()
    assert order[0] == "s_04999" and order[-1] == "s_00000" and len(order) == 5000
    assert pipeline.downstream("s_04997") == {"s_04996", *(f"s_{i:05d}" for i in range(4996))}


def test_a_long_cycle_is_named_without_recursion() -> None:
    """A cycle through 3,000 stages is reported, not a stack overflow."""
    doc = _chain(3000)
    doc["stages"]["s_02999"]["needs"] = ["s_00000"]
    with pytest.raises(SpecError, match=r"cycle: s_00000 -> s_00001 -> .* -> s_02999 -> s_00000"):
        specs.parse(doc, where="c", limits=specs.Limits(max_stages=10_000))


def test_stage_count_over_the_limit_is_refused_naming_it() -> None:
    """101 stages with the default limit of 100: refused before any stage is checked."""
    from pipelines.errors import PipelineTooLargeError

    with pytest.raises(PipelineTooLargeError, match=r"101 stages, over the limit of 100"):
        specs.parse(_chain(101), where="c")
    assert len(specs.parse(_chain(100), where="c").stages) == 100


@pytest.mark.parametrize("depth", [40, 5000, 100_000])
def test_deep_nesting_is_a_spec_error(depth: int) -> None:
    """A spec nested deeper than the limit is a SpecError (a 400), never a RecursionError,
    whether it comes as data or as YAML text."""
    doc: Any = "x"
    for _ in range(depth):
        doc = [doc]
    with pytest.raises(SpecError, match="nested more than 32 levels"):
        specs.parse({"stages": {"a": {"model": IMG, "input": {"prompt": doc}}}}, where="d")
    text = "stages: " + "[" * depth + "]" * depth
    with pytest.raises(SpecError, match=r"nested more than|invalid YAML"):
        specs.parse_text(text, where="d.yaml")


def test_a_pipeline_may_set_a_deadline_and_a_budget() -> None:
    stages = {"a": {"model": IMG, "input": {"prompt": "p"}}}
    p = specs.parse({"stages": stages, "deadline": 600, "budget_usd": 2.5}, where="t")
    assert (p.deadline_s, p.budget_usd) == (600.0, 2.5)
    assert specs.parse({"stages": stages}, where="t").deadline_s is None


@pytest.mark.parametrize(
    ("key", "value", "rule"),
    [
        ("deadline", 0, "deadline: must be seconds in range 1..2592000"),
        ("deadline", "1h", "deadline: must be seconds (a number)"),
        ("deadline", True, "deadline: must be seconds (a number)"),
        ("budget_usd", -1, "budget_usd: must be in range 0..1000000 USD"),
        ("budget_usd", "5", "budget_usd: must be a number of USD"),
    ],
)
def test_a_bad_deadline_or_budget_is_named(key: str, value: Any, rule: str) -> None:
    stages = {"a": {"model": IMG, "input": {"prompt": "p"}}}
    with pytest.raises(SpecError, match=rule.replace("(", r"\(").replace(")", r"\)")):
        specs.parse({"stages": stages, key: value}, where="t")


def test_a_stage_s_checks_are_all_by_default_off_or_a_list() -> None:
    def checks(value: Any) -> frozenset[str]:
        doc = {"stages": {"a": {"model": IMG, "input": {"prompt": "p"}, "checks": value}}}
        return specs.parse(doc, where="t").stages["a"].checks

    assert (
        checks(None) == checks("on") == frozenset({"media", "size", "format", "duration", "nsfw"})
    )
    assert checks("off") == checks(False) == frozenset()
    assert checks(["size", "nsfw"]) == frozenset({"size", "nsfw"})
    with pytest.raises(SpecError, match="stage 'a': checks: must be on, off, or a list of"):
        checks(["colour"])
