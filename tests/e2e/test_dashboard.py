"""The dashboard in a real browser (Debian's Chromium, driven by Playwright): a pipeline
run on the emulator, its graph, its outputs loaded as media, and a change appearing live.
Screenshots go to the test's folder (or to $WAVECHAIN_SCREENSHOTS, for docs/)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.support.aws import AwsSandbox, sandbox
from tests.support.browser import ARGS, find_chromium
from tests.support.procs import emulator_and_serve

SECRET = "whsec_ZGFzaGJvYXJkLXRlc3Q="
TOKEN = "dashboard-token-for-the-test"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, moto_endpoint: str) -> Iterator[dict[str, Any]]:
    """The emulator (tasks take 1.5 s, so a change can be watched) and `serve` with an S3
    bucket and an API token."""
    tmp = tmp_path_factory.mktemp("dashboard")
    aws: AwsSandbox = sandbox(moto_endpoint)
    env = {
        "S3_BUCKET": aws.bucket, "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "WAVECHAIN_API_TOKEN": TOKEN,
    }  # fmt: skip
    with emulator_and_serve(tmp, SECRET, env, latency=1.5) as url:
        yield {"url": url, "tmp": tmp}
    log = (tmp / "serve.log").read_text()
    assert TOKEN not in log and "ZGFzaGJvYXJk" not in log


@pytest.fixture(scope="module")
def browser_page(stack: dict[str, Any]) -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=find_chromium(), args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("console", lambda message: print("browser:", message.type, message.text))
        yield page
        browser.close()
        assert errors == [], errors


def _shot(page: Page, stack: dict[str, Any], name: str) -> None:
    folder = Path(os.environ.get("WAVECHAIN_SCREENSHOTS") or stack["tmp"])
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def _start(page: Page, stack: dict[str, Any], pipeline: str, **inputs: str) -> str:
    """Start a run of a bundled pipeline from the New run form; the run's id."""
    page.goto(f"{stack['url']}/#/new")
    dialog = page.locator("#token-dialog")
    if dialog.is_visible():
        page.fill("#token-input", TOKEN)
        page.click("#token-form button")
    page.select_option("form.new select[name=pipeline]", pipeline)
    for name, value in inputs.items():
        page.fill(f"form.new input[name={name}]", value)
    page.click("form.new button[type=submit]")
    page.wait_for_url("**/#/runs/*")
    return page.url.rsplit("/", 1)[-1]


def test_the_token_is_asked_once_and_a_run_is_drawn_live_with_its_media(
    browser_page: Page, stack: dict[str, Any]
) -> None:
    """image_video_3d, started from the page: the token is asked for; the graph shows
    every stage and both edges from the image; a stage's change appears without a reload;
    the image has its requested size, the video its duration, the 3D viewer its mesh; a
    prompt with markup is shown as text."""
    page = browser_page
    page.goto(f"{stack['url']}/")
    expect(page.locator("#token-dialog")).to_be_visible()
    page.fill("#token-input", TOKEN)
    page.click("#token-form button")
    expect(page.locator("#runs")).to_be_visible()
    prompt = '<b id="injected">a fox</b> & "friends"'
    run_id = _start(page, stack, "image_video_3d", prompt=prompt, seed="7")
    graph = page.locator("#dag")
    for stage in ("image", "video", "mesh"):
        expect(graph.locator(f"g[data-stage={stage}]")).to_have_count(1)
    for edge in ("image->video", "image->mesh"):
        expect(graph.locator(f'path[data-edge="{edge}"]')).to_have_count(1)
    # Live: the video stage is seen waiting, then succeeded, with no reload in between.
    page.evaluate("window.__notReloaded = true")
    expect(graph.locator("g[data-stage=video]")).not_to_have_attribute(
        "data-status", "succeeded", timeout=1000
    )
    expect(page.locator("#live")).to_have_attribute("data-state", "live")
    expect(graph.locator("g[data-stage=video]")).to_have_attribute(
        "data-status", "succeeded", timeout=30_000
    )
    expect(page.locator("h1 .badge")).to_have_attribute("data-status", "succeeded", timeout=30_000)
    assert page.evaluate("window.__notReloaded") is True
    # Text, never markup: the prompt is shown as typed and injected nothing.
    assert page.locator("#injected").count() == 0
    expect(page.locator('dd[data-input="prompt"]')).to_have_text(prompt)
    image = page.locator("img[data-preview=image]")
    page.wait_for_function(
        "() => { const i = document.querySelector('img[data-preview=image]');"
        " return i && i.complete && i.naturalWidth > 0; }",
        timeout=20_000,
    )
    size = image.evaluate("i => [i.naturalWidth, i.naturalHeight]")
    assert size == [1280, 720]  # the example asks for 1280*720
    page.wait_for_function(
        "() => { const v = document.querySelector('video[data-preview=video]');"
        " return v && v.readyState >= 1; }",
        timeout=20_000,
    )
    seconds = page.locator("video[data-preview=video]").evaluate("v => v.duration")
    assert abs(seconds - 5) < 0.6  # the example asks for 5 s
    viewer = page.locator("model-viewer[data-preview=mesh]")
    expect(viewer).to_have_attribute("data-loaded", "true", timeout=30_000)
    assert viewer.evaluate("m => m.loaded") is True
    deliveries = page.locator("section[data-stage=image] .deliveries tr[data-effect=applied]")
    expect(deliveries).to_have_count(1)
    page.wait_for_timeout(1500)  # the 3D viewer's first frames
    _shot(page, stack, "image_video_3d")
    assert run_id.startswith("run_")


def test_a_fan_in_pipeline_is_drawn_and_actions_work(
    browser_page: Page, stack: dict[str, Any]
) -> None:
    """storyboard (t2v and Hunyuan Image 3 side by side, 3D from a keyframe): every stage
    and edge drawn, both keyframes shown; then a retry from a stage starts it again, and
    the list shows the run."""
    page = browser_page
    _start(page, stack, "storyboard")
    graph = page.locator("#dag")
    for stage in ("clip", "keyframes", "prop"):
        expect(graph.locator(f"g[data-stage={stage}]")).to_have_count(1)
    expect(graph.locator('path[data-edge="keyframes->prop"]')).to_have_count(1)
    expect(page.locator("h1 .badge")).to_have_attribute("data-status", "succeeded", timeout=40_000)
    expect(page.locator("section[data-stage=keyframes] img[data-preview=image]")).to_have_count(2)
    expect(page.locator("model-viewer[data-preview=mesh]")).to_have_attribute(
        "data-loaded", "true", timeout=30_000
    )
    page.wait_for_timeout(1500)
    _shot(page, stack, "storyboard")
    page.select_option("select[aria-label=stage]", "prop")
    page.click("button[data-action='Retry from']")
    expect(graph.locator("g[data-stage=prop]")).to_have_attribute(
        "data-status", "succeeded", timeout=30_000
    )
    expect(page.locator("section[data-stage=prop] dd").nth(1)).to_have_text("2")
    page.goto(f"{stack['url']}/#/?pipeline=storyboard")
    expect(page.locator("#runs tbody tr")).to_have_count(1)
