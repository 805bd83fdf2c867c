"""infra/ checked against the code it deploys: names, ports, routes, timings, permissions.

No cluster or AWS account here: these tests read the manifests and compare them with what
`wavechain serve` really reads, serves and calls, so that neither can drift from the other.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from aiohttp import web

from pipelines.mirror import MirrorConfig, S3Mirror
from service.cli import build_parser
from service.routes import setup_routes
from service.settings import _VARIABLES, Settings

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
SETTINGS_NAMES = {name for name, _, _ in _VARIABLES}
#: Read by Python or pip in the image, not by wavechain.
PROCESS_NAMES = {"PATH", "PYTHONUNBUFFERED", "PIP_DISABLE_PIP_VERSION_CHECK", "PIP_NO_CACHE_DIR"}

#: boto3 client method → the IAM action AWS checks for it.
IAM_ACTIONS: dict[str, dict[str, str | None]] = {
    "s3": {
        "put_object": "s3:PutObject",
        "create_multipart_upload": "s3:PutObject",
        "upload_part": "s3:PutObject",
        "complete_multipart_upload": "s3:PutObject",
        "abort_multipart_upload": "s3:AbortMultipartUpload",
        "put_object_tagging": "s3:PutObjectTagging",
        "get_object_tagging": "s3:GetObjectTagging",
        "head_object": "s3:GetObject",
        "get_object": "s3:GetObject",
        "copy": "s3:GetObject",  # a server-side copy (result cache): read, then PutObject
        "list_objects_v2": "s3:ListBucket",
        "generate_presigned_url": None,  # local signing; the URL's own method is checked
    },
    "sns": {"publish_batch": "sns:Publish", "publish": "sns:Publish"},
}


def _manifests() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in docs, f"a second {doc['kind']}: the tests read one"
            docs[doc["kind"]] = doc
    return docs


def _container(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return cast(dict[str, Any], container)


def _dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuations joined."""
    text = re.sub(r"\\\n\s*", " ", (INFRA / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.partition(" ") for line in lines)
        if word and not word.startswith("#")
    ]


def _docker_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in _dockerfile():
        if word == "ENV":
            env.update(part.split("=", 1) for part in shlex.split(rest))  # type: ignore[misc]
    return env


def _deployment_env(docs: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The environment the pod starts with, secrets filled with well-formed stand-ins."""
    env = dict(_docker_env())
    env.update(docs["ConfigMap"]["data"])
    for item in _container(docs)["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "wavechain-secrets"
            stand_in = "whsec_c3RhbmQtaW4=" if item["name"].endswith("SECRETS") else "stand-in"
            env[item["name"]] = stand_in
    return env


class _CfnLoader(yaml.SafeLoader):
    """CloudFormation's short forms (!Ref, !Sub, !GetAtt...) as their long forms."""


def _cfn_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(cast(yaml.MappingNode, node), deep=True)
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {"Ref" if suffix == "Ref" else f"Fn::{suffix}": value}


_CfnLoader.add_multi_constructor("!", _cfn_tag)


def _template() -> dict[str, Any]:
    text = (INFRA / "cloudformation" / "wavechain.yaml").read_text()
    return cast(dict[str, Any], yaml.load(text, Loader=_CfnLoader))  # noqa: S506 (a SafeLoader)


def _routes() -> set[tuple[str, str]]:
    app = web.Application()
    setup_routes(app)
    return {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource}


def test_every_variable_set_is_one_wavechain_reads() -> None:
    docs = _manifests()
    names = set(_docker_env()) | set(docs["ConfigMap"]["data"])
    names |= {item["name"] for item in _container(docs)["env"]}
    unknown = names - SETTINGS_NAMES - PROCESS_NAMES
    assert not unknown, f"set in infra/ but read by nothing: {sorted(unknown)}"


def test_the_pods_environment_parses_and_points_at_the_ingress() -> None:
    docs = _manifests()
    settings = Settings.from_env(_deployment_env(docs))  # raises ConfigError naming a bad one
    (rule,) = docs["Ingress"]["spec"]["rules"]
    tls_hosts = {h for t in docs["Ingress"]["spec"].get("tls", []) for h in t["hosts"]}
    scheme = "https" if rule["host"] in tls_hosts else "http"
    assert settings.base_url == f"{scheme}://{rule['host']}"
    (port,) = _container(docs)["ports"]
    assert settings.port == port["containerPort"]
    assert settings.host == "0.0.0.0"  # noqa: S104 (a pod must listen beyond loopback)
    assert settings.s3_bucket and settings.sns_topic_arn


def test_the_image_serves_on_its_exposed_port_with_its_store_on_the_volume() -> None:
    instructions = _dockerfile()
    env = _docker_env()
    settings = Settings.from_env(env | {"WAVESPEED_API_KEY": "k", "AIMLAPI_KEY": "k"})
    exposed = [int(rest) for word, rest in instructions if word == "EXPOSE"]
    assert exposed == [settings.port]
    (volume,) = [rest for word, rest in instructions if word == "VOLUME"]
    database = Path(settings.database_url.removeprefix("sqlite:///"))
    assert database.is_absolute() and database.parent == Path(volume)
    mounts = {m["mountPath"] for m in _container(_manifests())["volumeMounts"]}
    assert volume in mounts


def test_the_images_command_line_is_one_wavechain_accepts() -> None:
    instructions = dict(_dockerfile())
    entrypoint, cmd = json.loads(instructions["ENTRYPOINT"]), json.loads(instructions["CMD"])
    assert entrypoint[0] == "wavechain"
    assert build_parser().parse_args(entrypoint[1:] + cmd).command == "serve"
    args = _container(_manifests()).get("args", cmd)
    assert build_parser().parse_args(entrypoint[1:] + args).command == "serve"


def test_the_image_copies_every_package_and_the_build_context_lets_them_in() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in include}
    copied = {
        source
        for word, rest in _dockerfile()
        if word == "COPY" and "--from" not in rest
        for source in rest.split()[:-1]  # COPY SOURCE... DEST
    }
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}  # fmt: skip
    for needed in packages | {"pyproject.toml", "README.md"}:
        assert needed in allowed, f".dockerignore keeps {needed} out of the build context"
        assert needed in copied, f"the Dockerfile does not COPY {needed}"


def test_probes_ask_routes_that_exist() -> None:
    container = _container(_manifests())
    routes = _routes()
    port_names = {p["name"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert ("GET", get["path"]) in routes, f"{probe}: no GET {get['path']}"
        assert get["port"] in port_names
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"  # the one that drains


def test_the_pod_is_given_time_to_drain_and_finish() -> None:
    docs = _manifests()
    data = docs["ConfigMap"]["data"]
    defaults = Settings()
    drain = float(data.get("DRAIN_DELAY_S", defaults.drain_delay_s))
    grace = float(data.get("SHUTDOWN_GRACE_S", defaults.shutdown_grace_s))
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > drain + grace
    readiness = _container(docs)["readinessProbe"]
    noticed_within = readiness["periodSeconds"] * readiness["failureThreshold"]
    assert noticed_within < drain, "the drain ends before the probe notices it"


def test_one_writer_for_the_sqlite_store() -> None:
    docs = _manifests()
    spec = docs["Deployment"]["spec"]
    assert _deployment_env(docs)["DATABASE_URL"].startswith("sqlite:")
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"  # never an old and a new pod at once
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_only_the_callbacks_are_public_and_they_reach_the_pod() -> None:
    docs = _manifests()
    service, ingress = docs["Service"], docs["Ingress"]
    pod_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in {p["name"] for p in _container(docs)["ports"]}
    routes = _routes()
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == service["metadata"]["name"]
            assert backend["port"]["name"] == service_port["name"]
            exposed = {p for _, p in routes if p.startswith(path["path"])}
            assert exposed, f"ingress path {path['path']} reaches no route"
            assert all(p.startswith("/webhooks/") for p in exposed), sorted(exposed)
    assert any(p.startswith("/webhooks/wavespeed/") for p in exposed)


def test_the_ingress_lets_through_any_body_wavechain_would_take() -> None:
    docs = _manifests()
    size = docs["Ingress"]["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    number, unit = re.fullmatch(r"(\d+)([kmg]?)", size.lower()).groups()  # type: ignore[union-attr]
    limit = int(number) * 1024 ** " kmg".index(unit or " ")
    assert limit > Settings.from_env(_deployment_env(docs)).max_webhook_bytes


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    image = _container(_manifests())["image"]
    assert image in {i["name"] for i in kustomization["images"]}


def _client_calls() -> dict[str, set[str]]:
    """Every method the service calls on its boto3 S3 and SNS clients."""
    calls: dict[str, set[str]] = {"s3": set(), "sns": set()}
    for path in [*(ROOT / "pipelines").glob("*.py"), *(ROOT / "service").glob("*.py")]:
        if path.name in ("demo.py", "tail.py"):
            continue  # the local demo's set-up and the `events tail` tool, not the service
        text = path.read_text()
        for service in calls:
            calls[service] |= set(re.findall(rf"self\._{service}\.(\w+)", text))
        calls["s3"] |= set(re.findall(r'ClientMethod="(\w+)"', text))
    return calls


def test_the_policy_grants_every_call_the_service_makes() -> None:
    calls = _client_calls()
    assert {"put_object", "upload_part", "publish_batch"} <= calls["s3"] | calls["sns"]
    statements = _template()["Resources"]["ServicePolicy"]["Properties"]["PolicyDocument"][
        "Statement"
    ]
    granted = set()
    for statement in statements:
        actions = statement["Action"]
        granted |= {actions} if isinstance(actions, str) else set(actions)
    for service, methods in calls.items():
        for method in methods:
            assert method in IAM_ACTIONS[service], f"{service}.{method}: add its IAM action here"
            action = IAM_ACTIONS[service][method]
            assert action is None or action in granted, f"{service}.{method} needs {action}"


def test_the_policy_covers_the_keys_the_mirror_writes() -> None:
    statements = _template()["Resources"]["ServicePolicy"]["Properties"]["PolicyDocument"][
        "Statement"
    ]
    (objects,) = [s for s in statements if "s3:PutObject" in s["Action"]]
    pattern = objects["Resource"]["Fn::Sub"].replace("${Bucket.Arn}", "arn:aws:s3:::b")
    for prefix in ("", "prod/", "team/a/"):
        mirror = S3Mirror(cast(Any, None), cast(Any, None), MirrorConfig("b", prefix),
                          limiter=cast(Any, None))  # fmt: skip
        key = f"{mirror.key_stem('run-1', 'image', 0)}.png"
        assert fnmatch.fnmatchcase(f"arn:aws:s3:::b/{key}", pattern.replace("${Prefix}", prefix))


def test_the_stacks_outputs_are_the_variables_the_service_reads() -> None:
    outputs = _template()["Outputs"]
    described = {o["Description"].split()[0] for o in outputs.values()}
    assert {"S3_BUCKET", "S3_PREFIX", "SNS_TOPIC_ARN"} <= described
    assert {"S3_BUCKET", "S3_PREFIX", "SNS_TOPIC_ARN"} <= SETTINGS_NAMES


@pytest.mark.parametrize("module", ["service.cli", "service.app"])
def test_the_service_runs_without_the_local_extras(module: str) -> None:
    """The image installs no extras: the emulator's media libraries and moto stay out."""
    blocked = ("PIL", "av", "pygltflib", "moto", "werkzeug", "emulator")
    code = (
        f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); import {module}; "
        "from service.app import create_app; from service.settings import Settings; "
        "from pipelines.secrets import Secret; "
        "create_app(Settings(wavespeed_api_key=Secret('k'), aimlapi_key=Secret('k')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_pod_runs_as_the_images_user() -> None:
    instructions = _dockerfile()
    (user,) = [rest for word, rest in instructions if word == "USER"]
    uid, gid = (int(x) for x in user.split(":"))
    created = " ".join(rest for word, rest in instructions if word == "RUN")
    assert f"--uid {uid}" in created and f"--gid {gid}" in created
    pod = _manifests()["Deployment"]["spec"]["template"]["spec"]["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) == (uid, gid, gid)


def _tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def test_the_template_passes_cfn_lint() -> None:
    """AWS's resource schemas: property names, types and values CloudFormation accepts."""
    template = INFRA / "cloudformation" / "wavechain.yaml"
    result = subprocess.run([_tool("cfn-lint"), str(template)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_manifests_match_the_kubernetes_schemas() -> None:
    """Strict: a misspelt field is an error, not silently dropped by the API server."""
    files = sorted(str(p) for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    result = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", "--quiet", *files],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout + result.stderr


OVERLAY = INFRA / "k8s-postgres"


def _kubectl() -> str:
    """kubectl (for `kubectl kustomize`): found, or Debian's kubernetes-client installed."""
    import os
    import shutil

    found = shutil.which("kubectl")
    if found:
        return found
    assert os.geteuid() == 0 and shutil.which("apt-get"), "kubectl is missing"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "kubernetes-client"]
    if subprocess.run(install, capture_output=True, env=env, check=False).returncode:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, check=True)
        subprocess.run(install, capture_output=True, env=env, check=True)
    found = shutil.which("kubectl")
    assert found, "kubernetes-client installed no kubectl"
    return found


def _rendered(folder: Path) -> dict[str, dict[str, Any]]:
    out = subprocess.run(
        [_kubectl(), "kustomize", str(folder)], capture_output=True, text=True, check=True
    ).stdout
    docs = {}
    for doc in yaml.safe_load_all(out):
        assert doc["kind"] not in docs
        docs[doc["kind"]] = doc
    return docs


def test_the_postgres_overlay_runs_replicas_that_roll_and_keep_a_quorum() -> None:
    """Rendered: three or more replicas on the PostgreSQL URL from the Secret, no volume,
    rolling updates that never take a replica away first, a disruption budget that keeps
    two, an autoscaler that never goes below the replicas; the pod's environment parses."""
    docs = _rendered(OVERLAY)
    deployment = docs["Deployment"]
    spec = deployment["spec"]
    assert spec["replicas"] >= 3
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert "PersistentVolumeClaim" not in docs
    pod = spec["template"]["spec"]
    assert "state" not in {v["name"] for v in pod["volumes"]}
    container = _container(docs)
    assert "/var/lib/wavechain" not in {m["mountPath"] for m in container["volumeMounts"]}
    (url,) = [e for e in container["env"] if e["name"] == "DATABASE_URL"]
    assert url["valueFrom"]["secretKeyRef"] == {"name": "wavechain-secrets", "key": "DATABASE_URL"}
    env = _deployment_env(docs) | {"DATABASE_URL": "postgresql://wavechain@db.example.com/wc"}
    settings = Settings.from_env(env)
    assert settings.database_url.startswith("postgresql://") and settings.database_pool_size > 1
    labels = pod_labels = spec["template"]["metadata"]["labels"]
    pdb = docs["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    assert 1 <= pdb["minAvailable"] < spec["replicas"]
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["minReplicas"] >= spec["replicas"] and hpa["maxReplicas"] > hpa["minReplicas"]
    assert labels["app.kubernetes.io/name"] == "wavechain"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"  # red on drain


def test_both_kustomizations_render_to_manifests_the_schemas_accept(tmp_path: Path) -> None:
    """The base and the overlay, rendered, pass kubernetes-validate --strict."""
    for name, folder in (("base", K8S), ("postgres", OVERLAY)):
        out = subprocess.run(
            [_kubectl(), "kustomize", str(folder)], capture_output=True, text=True, check=True
        ).stdout
        (tmp_path / f"{name}.yaml").write_text(out)
    result = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", "--quiet",
         str(tmp_path / "base.yaml"), str(tmp_path / "postgres.yaml")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout + result.stderr
