"""Deployment artefacts: docker-compose.yml, the Kustomize overlays, the Dockerfile and the init job.

No container engine or cluster is needed: the compose file is checked against the Compose
specification's JSON schema, every overlay is rendered with `kubectl kustomize` and every built-in
object validated against the Kubernetes OpenAPI schema (kubernetes-validate, offline); Strimzi and
CloudNativePG resources against the CRD fields pinned in tests/data/operator-schemas.yaml. The
environment variables set for each service are compared with the services' settings models, so
the deployment and the code cannot drift apart. The Postgres init script and deploy/init.py run
for real against the test harness's PostgreSQL and broker.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import jsonschema
import kubernetes_validate
import pytest
import yaml
from aiokafka import AIOKafkaConsumer
from alembic.script import ScriptDirectory
from pydantic import AliasChoices, AliasPath
from pydantic_settings import BaseSettings

from crm_common.infra import PG_USER
from crm_common.migrations import alembic_config
from crm_common.settings import ALL_TOPICS, SERVICE_PORTS, BaseServiceSettings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
INIT_SCRIPT = ROOT / "deploy" / "init.py"
PG_INIT_SCRIPT = ROOT / "deploy" / "compose" / "postgres-init.sh"
OPERATOR_SCHEMAS = Path(__file__).parent / "data" / "operator-schemas.yaml"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
K8S_VERSION = "1.32.0"
SERVICES = tuple(SERVICE_PORTS)
# The compose service / Kubernetes Job that runs deploy/init.py.
INIT_COMPOSE_SERVICE = "init"
INIT_JOB = "crm-migrate"
# ingest only produces (HTTP in, outbox out); every other service consumes topics, so its
# replicas beyond the partition count would sit idle.
CONSUMER_SERVICES = tuple(s for s in SERVICES if s != "ingest")
ENV_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


# ---- what the code accepts ------------------------------------------------------------------


def env_names(settings_cls: type[BaseSettings]) -> set[str]:
    """The environment variable names a pydantic-settings class reads (upper-cased)."""
    prefix = settings_cls.model_config.get("env_prefix", "") or ""
    names: set[str] = set()
    for field_name, field in settings_cls.model_fields.items():
        alias = field.validation_alias or field.alias
        if alias is None:
            names.add(f"{prefix}{field_name}".upper())
            continue
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
        for choice in choices:
            # An AliasPath reads a nested value under its first element, the variable's name.
            env = choice.path[0] if isinstance(choice, AliasPath) else choice
            if isinstance(env, str):
                names.add(env.upper())
    return names


@cache
def service_settings_cls(service: str) -> type[BaseServiceSettings]:
    cls = importlib.import_module(f"{service}.settings").Settings
    assert issubclass(cls, BaseServiceSettings)
    return cls  # type: ignore[no-any-return]


@cache
def init_module() -> Any:
    spec = importlib.util.spec_from_file_location("crm_deploy_init", INIT_SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def accepted_env(workload: str) -> set[str]:
    """Names a workload understands: a service its settings; the init job every service's + its own."""
    if workload == "init":
        return set().union(*(accepted_env(s) for s in SERVICES), env_names(init_module().InitSettings))
    return env_names(service_settings_cls(workload))


def test_settings_env_names_are_derived_from_the_models() -> None:
    names = accepted_env("loyalty")
    assert {"LOYALTY_DATABASE_URL", "LOYALTY_DB_POOL_SIZE", "KAFKA_BOOTSTRAP_SERVERS", "CRM_TOPIC_PREFIX"} <= names
    # Shared settings are read un-prefixed only (pydantic-settings skips the prefix for aliases).
    assert "LOYALTY_KAFKA_BOOTSTRAP_SERVERS" not in names
    assert "DATABASE_URL" not in names
    assert {"CRM_BOOTSTRAP_API_KEY", "INGEST_DATABASE_URL", "NOTIFIER_DATABASE_URL"} <= accepted_env("init")


# ---- docker-compose ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@cache
def compose_validator() -> jsonschema.protocols.Validator:
    # check-jsonschema vendors the Compose specification's schema; nothing is fetched at test time.
    schema = json.loads((resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def schema_errors(validator: jsonschema.protocols.Validator, document: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def test_compose_file_is_valid_against_the_compose_specification(compose: dict[str, Any]) -> None:
    assert schema_errors(compose_validator(), compose) == []


def test_compose_schema_rejects_a_misspelt_service_key(compose: dict[str, Any]) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["loyalty"]["helthcheck"] = broken["services"]["loyalty"].pop("healthcheck")
    broken["services"]["ingest"]["depends_on"]["init"]["condition"] = "service_completed"
    errors = schema_errors(compose_validator(), broken)
    assert any("helthcheck" in e for e in errors), errors
    assert any(e.startswith("services/ingest/depends_on") for e in errors), errors


def test_compose_runs_each_service_by_command_with_a_readiness_healthcheck(compose: dict[str, Any]) -> None:
    for service, port in SERVICE_PORTS.items():
        svc = compose["services"][service]
        assert svc["command"] == ["python", "-m", "crm_common.serve", service, "--host", "0.0.0.0", "--port", str(port)]
        assert svc["build"]["dockerfile"] == "Dockerfile"
        assert any(p.endswith(f":{port}:{port}") for p in svc["ports"]), svc["ports"]
        probe = " ".join(svc["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port}/readyz" in probe
    assert compose["services"][INIT_COMPOSE_SERVICE]["command"] == ["python", "deploy/init.py"]


def test_compose_services_start_after_healthy_kafka_and_postgres_and_a_completed_init(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("kafka", "postgres"):
        assert services[name]["healthcheck"]["test"], name
    init_deps = services[INIT_COMPOSE_SERVICE]["depends_on"]
    assert init_deps == {"kafka": {"condition": "service_healthy"}, "postgres": {"condition": "service_healthy"}}
    assert services[INIT_COMPOSE_SERVICE]["restart"] == "no"
    for service in SERVICES:
        deps = services[service]["depends_on"]
        assert deps[INIT_COMPOSE_SERVICE]["condition"] == "service_completed_successfully"
        assert deps["kafka"]["condition"] == "service_healthy"
        assert deps["postgres"]["condition"] == "service_healthy"


def test_compose_kafka_is_a_single_kraft_broker_and_controller(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = compose_env(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    protocols = dict(p.split(":") for p in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    listeners = {item.split("://")[0] for item in env["KAFKA_LISTENERS"].split(",")}
    assert listeners <= set(protocols)
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in listeners
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in listeners
    assert "zookeeper" not in " ".join(env).lower()
    advertised = dict(item.split("://") for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    # The services reach the broker at the address it advertises on the internal listener.
    for service in (*SERVICES, INIT_COMPOSE_SERVICE):
        assert compose_env(compose["services"][service])["KAFKA_BOOTSTRAP_SERVERS"] == advertised["PLAINTEXT"]


def test_compose_postgres_has_one_database_and_role_per_service_with_matching_passwords(
    compose: dict[str, Any],
) -> None:
    postgres = compose["services"]["postgres"]
    assert postgres["image"].startswith("postgres:15")
    env = compose_env(postgres)
    assert env["CRM_SERVICES"].split() == list(SERVICES)
    assert any(
        v.startswith("./deploy/compose/postgres-init.sh:/docker-entrypoint-initdb.d/") for v in postgres["volumes"]
    )
    init_env = compose_env(compose["services"][INIT_COMPOSE_SERVICE])
    for service in SERVICES:
        url = compose_env(compose["services"][service])[f"{service.upper()}_DATABASE_URL"]
        parts = urlsplit(url)
        assert (parts.scheme, parts.username, parts.hostname, parts.port, parts.path) == (
            "postgresql+asyncpg",
            service,
            "postgres",
            5432,
            f"/{service}",
        ), url
        # urlsplit cannot parse ${VAR:-default} as a password, so compare the raw text.
        password = url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
        assert password == env[f"CRM_DB_PASSWORD_{service.upper()}"]
        assert init_env[f"{service.upper()}_DATABASE_URL"] == url, "init job migrates a different database"


def test_compose_provider_sinks_are_optional(compose: dict[str, Any]) -> None:
    assert compose["services"]["mailpit"]["profiles"] == ["sinks"]
    assert "mailpit" not in compose["services"]["notifier"].get("depends_on", {})


# ---- Kubernetes: render ------------------------------------------------------------------------


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in Kustomize) is not installed; `apt-get install kubectl` provides it")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def test_there_are_dev_and_prod_overlays() -> None:
    assert {"dev", "prod"} <= set(OVERLAYS)


def by_kind(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@cache
def operator_schemas() -> dict[str, jsonschema.protocols.Validator]:
    doc = yaml.safe_load(OPERATOR_SCHEMAS.read_text())
    validators = {}
    for key, schema in doc["kinds"].items():
        full = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$defs": doc["$defs"], **schema}
        jsonschema.Draft202012Validator.check_schema(full)
        validators[key] = jsonschema.Draft202012Validator(full)
    return validators


def operator_key(doc: dict[str, Any]) -> str:
    return f"{doc['apiVersion']}/{doc['kind']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_builtin_objects_are_valid_kubernetes(overlay: str) -> None:
    problems, validated = [], 0
    for doc in render(overlay):
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            validated += 1
        except kubernetes_validate.SchemaNotFoundError:
            # Not a built-in kind: it must be one of the operator kinds this suite pins.
            if operator_key(doc) not in operator_schemas():
                problems.append(f"{where}: {operator_key(doc)} is neither built-in nor a pinned operator kind")
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{where}: {'/'.join(map(str, exc.path))}: {exc.message}")
    assert problems == []
    assert validated >= 5 * len(SERVICES)


def test_kubernetes_validation_rejects_a_misspelt_field() -> None:
    deployment = copy.deepcopy(by_kind(render("prod"), "Deployment")["loyalty"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_operator_resources_have_the_pinned_crd_fields(overlay: str) -> None:
    problems = []
    for doc in render(overlay):
        validator = operator_schemas().get(operator_key(doc))
        if validator is not None:
            where = f"{doc['kind']}/{doc['metadata']['name']}"
            problems += [f"{where}: {e}" for e in schema_errors(validator, doc)]
    assert problems == []
    kinds = {d["kind"] for d in render(overlay)}
    assert {"Kafka", "KafkaNodePool", "KafkaTopic", "Cluster"} <= kinds


@pytest.mark.parametrize(
    ("kind", "name", "mutate"),
    [
        ("KafkaTopic", "crm-events-v1", lambda d: d["spec"].__setitem__("partition", d["spec"].pop("partitions"))),
        ("Kafka", "crm-kafka", lambda d: d["spec"].__setitem__("zookeeper", {"replicas": 3})),
        ("Kafka", "crm-kafka", lambda d: d["metadata"]["annotations"].pop("strimzi.io/kraft")),
        ("KafkaNodePool", "dual-role", lambda d: d["spec"]["roles"].append("zookeeper")),
        ("Cluster", "crm-pg-loyalty", lambda d: d["spec"].__setitem__("instance", d["spec"].pop("instances"))),
        ("Cluster", "crm-pg-offers", lambda d: d["spec"]["bootstrap"]["initdb"].__setitem__("databse", "offers")),
        ("ScheduledBackup", "crm-pg-ingest-nightly", lambda d: d["spec"].__setitem__("schedule", "0 2 * * *")),
    ],
)
def test_operator_schemas_reject_typos(kind: str, name: str, mutate: Any) -> None:
    doc = copy.deepcopy(by_kind(render("prod"), kind)[name])
    validator = operator_schemas()[operator_key(doc)]
    assert schema_errors(validator, doc) == []
    mutate(doc)
    assert schema_errors(validator, doc) != []


# ---- Kubernetes: wiring ------------------------------------------------------------------------


def container_env(
    docs: tuple[dict[str, Any], ...], container: dict[str, Any]
) -> tuple[dict[str, str | None], set[str]]:
    """(name -> literal value or None when from a ref, names only used inside $(...) of others)."""
    env: dict[str, str | None] = {}
    configmaps, secrets = by_kind(docs, "ConfigMap"), by_kind(docs, "Secret")
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            ref = source["configMapRef"]["name"]
            assert ref in configmaps, f"envFrom: no ConfigMap {ref}"
            env.update(configmaps[ref].get("data", {}))
        else:
            ref = source["secretRef"]["name"]
            assert ref in secrets, f"envFrom: no Secret {ref}"
            env.update(dict.fromkeys({*secrets[ref].get("data", {}), *secrets[ref].get("stringData", {})}))
    helpers: set[str] = set()
    for item in container.get("env", []):
        value_from = item.get("valueFrom")
        if value_from:
            for kind, key in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                if kind in value_from:
                    ref = value_from[kind]
                    target = by_kind(docs, key).get(ref["name"])
                    assert target is not None, f"{item['name']}: no {key} {ref['name']}"
                    keys = {*target.get("data", {}), *target.get("stringData", {})}
                    assert ref["key"] in keys, f"{item['name']}: {key} {ref['name']} has no key {ref['key']}"
        for used in ENV_REF.findall(item.get("value", "")):
            # Kubernetes expands $(NAME) only for variables defined before this one.
            assert used in env, f"{item['name']} uses $({used}) before it is defined"
            helpers.add(used)
        env[item["name"]] = item.get("value")
    return env, helpers


def workloads(docs: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(settings owner, container): each service's Deployment and the migration Job."""
    deployments = by_kind(docs, "Deployment")
    for service in SERVICES:
        yield service, deployments[service]["spec"]["template"]["spec"]["containers"][0]
    yield "init", by_kind(docs, "Job")[INIT_JOB]["spec"]["template"]["spec"]["containers"][0]


def environments() -> Iterator[tuple[str, str, dict[str, str | None], set[str]]]:
    """(where, workload, env, helper names) for compose and every overlay."""
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    for workload in (*SERVICES, "init"):
        name = INIT_COMPOSE_SERVICE if workload == "init" else workload
        yield "compose", workload, dict(compose_env(compose["services"][name])), set()
    for overlay in OVERLAYS:
        docs = render(overlay)
        for workload, container in workloads(docs):
            env, helpers = container_env(docs, container)
            yield f"k8s/{overlay}", workload, env, helpers


def test_every_env_var_set_for_a_service_is_one_of_its_settings() -> None:
    unknown = []
    for where, workload, env, helpers in environments():
        stray = set(env) - helpers - accepted_env(workload)
        unknown += [f"{where} {workload}: {name}" for name in sorted(stray)]
    assert unknown == [], "names the settings models do not read (typo, or a renamed setting)"


def test_every_service_gets_its_database_url_and_the_kafka_bootstrap_servers() -> None:
    seen = set()
    for where, workload, env, _ in environments():
        seen.add(where)
        needed = [f"{s.upper()}_DATABASE_URL" for s in (SERVICES if workload == "init" else [workload])]
        for name in [*needed, "KAFKA_BOOTSTRAP_SERVERS"]:
            assert env.get(name), f"{where} {workload}: {name} is not set"
    assert seen == {"compose", *(f"k8s/{o}" for o in OVERLAYS)}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_service_urls_and_kafka_address_resolve_to_resources_of_the_overlay(overlay: str) -> None:
    docs = render(overlay)
    clusters = by_kind(docs, "Cluster")
    rw_services = {f"{name}-rw" for name in clusters}
    rw_services |= {
        extra["serviceTemplate"]["metadata"]["name"]
        for c in clusters.values()
        for extra in c["spec"].get("managed", {}).get("services", {}).get("additional", [])
        if extra["selectorType"] == "rw"
    }
    pod_labels = [c["spec"].get("inheritedMetadata", {}).get("labels", {}) for c in clusters.values()]
    databases = {
        (c["spec"]["bootstrap"]["initdb"]["database"], c["spec"]["bootstrap"]["initdb"]["owner"])
        for c in clusters.values()
    }
    databases |= {(d["spec"]["name"], d["spec"]["owner"]) for d in by_kind(docs, "Database").values()}
    login_secrets = {
        c["spec"]["bootstrap"]["initdb"]["owner"]: c["spec"]["bootstrap"]["initdb"]["secret"]["name"]
        for c in clusters.values()
    }
    login_secrets |= {
        r["name"]: r["passwordSecret"]["name"]
        for c in clusters.values()
        for r in c["spec"].get("managed", {}).get("roles", [])
        if r.get("login") and r.get("ensure", "present") == "present"
    }
    secrets = by_kind(docs, "Secret")
    env = dict(
        container_env(docs, by_kind(docs, "Deployment")["ingest"]["spec"]["template"]["spec"]["containers"][0])[0]
    )
    for service in SERVICES:
        container = by_kind(docs, "Deployment")[service]["spec"]["template"]["spec"]["containers"][0]
        url = container_env(docs, container)[0][f"{service.upper()}_DATABASE_URL"]
        assert url is not None
        parts = urlsplit(url.replace("$(", "").replace(")", ""))
        assert parts.scheme == "postgresql+asyncpg"
        assert parts.hostname in rw_services, f"{service}: no CloudNativePG service {parts.hostname}"
        assert (parts.path.lstrip("/"), parts.username) in databases, f"{service}: database not created"
        secret = secrets[login_secrets[service]]
        assert secret["type"] == "kubernetes.io/basic-auth"
        assert secret.get("stringData", {}).get("username", service) == service
        assert any(labels.get(f"db.crm.io/{service}") == "true" for labels in pod_labels), service

    ((kafka_name, kafka),) = by_kind(docs, "Kafka").items()
    plain = next(li for li in kafka["spec"]["kafka"]["listeners"] if not li["tls"] and li["type"] == "internal")
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == f"{kafka_name}-kafka-bootstrap:{plain['port']}"
    for pool in by_kind(docs, "KafkaNodePool").values():
        assert pool["metadata"]["labels"]["strimzi.io/cluster"] == kafka_name
    for topic in by_kind(docs, "KafkaTopic").values():
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == kafka_name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_each_service_has_probes_resources_autoscaling_disruption_budget_and_network_policy(overlay: str) -> None:
    docs = render(overlay)
    deployments, hpas, pdbs, policies = (
        by_kind(docs, k) for k in ("Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy")
    )
    kafka_name = next(iter(by_kind(docs, "Kafka")))
    for service, port in SERVICE_PORTS.items():
        pod = deployments[service]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["command"] == [
            "python",
            "-m",
            "crm_common.serve",
            service,
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
        ]
        assert container["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert "memory" in container["resources"]["limits"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert "replicas" not in deployments[service]["spec"], "the HPA owns the replica count"
        assert by_kind(docs, "Service")[service]["spec"]["ports"][0]["port"] == port

        hpa = hpas[service]["spec"]
        assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": service}
        assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
        selector = {"app.kubernetes.io/name": service}
        assert pdbs[service]["spec"]["selector"]["matchLabels"] == selector

        policy = policies[service]["spec"]
        assert policy["podSelector"]["matchLabels"] == selector
        assert "Egress" in policy["policyTypes"]
        egress = policy["egress"]
        targets = [peer.get("podSelector", {}).get("matchLabels", {}) for rule in egress for peer in rule.get("to", [])]
        assert {f"db.crm.io/{service}": "true"} in targets
        assert {"strimzi.io/cluster": kafka_name, "strimzi.io/kind": "Kafka"} in targets
        assert {"k8s-app": "kube-dns"} in targets
        # Only its own database: no selector for another service's database pods.
        others = {f"db.crm.io/{o}" for o in SERVICES if o != service}
        assert not any(others & set(t) for t in targets), f"{service} may reach another database"
        assert all(rule.get("to") for rule in egress), f"{service}: an egress rule without 'to' allows everything"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_peer_urls_name_platform_services_that_the_network_policy_lets_the_caller_reach(overlay: str) -> None:
    """Every `http://<name>:<port>` a service is configured with is a Service of the overlay on that port, and the
    egress of a service with peers allows exactly its peers' pods on their ports (offers: segmentation and the
    notifier). The services without peers keep their rule to every service's port range (unused)."""
    docs = render(overlay)
    deployments, services, policies = (by_kind(docs, k) for k in ("Deployment", "Service", "NetworkPolicy"))
    peers_of: dict[str, set[tuple[str, int]]] = {}
    for service in SERVICES:
        (container,) = deployments[service]["spec"]["template"]["spec"]["containers"]
        for name, value in container_env(docs, container)[0].items():
            parts = urlsplit(value or "")
            if parts.scheme not in ("http", "https") or parts.hostname not in SERVICE_PORTS:
                continue
            assert parts.port == SERVICE_PORTS[parts.hostname], f"{service} {name}: {value}"
            assert services[parts.hostname]["spec"]["ports"][0]["port"] == parts.port, f"{service} {name}"
            peers_of.setdefault(service, set()).add((parts.hostname, parts.port))
    assert peers_of.get("offers") == {("segmentation", 8002), ("notifier", 8005)}
    for service, peers in peers_of.items():
        reached = set()
        for rule in policies[service]["spec"]["egress"]:
            for peer in rule["to"]:
                labels = peer.get("podSelector", {}).get("matchLabels", {})
                if labels.get("app.kubernetes.io/component") != "service":
                    continue
                assert labels.get("app.kubernetes.io/name") in SERVICE_PORTS, f"{service}: egress to any service"
                for port in rule.get("ports", []):
                    assert "endPort" not in port, f"{service}: a port range to the services"
                    reached.add((labels["app.kubernetes.io/name"], port["port"]))
        assert reached == peers, f"{service} reaches {reached}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_topics_are_the_platform_topics_with_enough_partitions_for_the_consumers(overlay: str) -> None:
    docs = render(overlay)
    topics = by_kind(docs, "KafkaTopic")
    assert sorted(t["spec"]["topicName"] for t in topics.values()) == sorted(ALL_TOPICS)
    shared = by_kind(docs, "ConfigMap")["crm-shared"]["data"]
    assert shared["CRM_TOPIC_PREFIX"] == "", "KafkaTopic names carry no prefix"
    partitions = int(shared["KAFKA_TOPIC_PARTITIONS"])
    brokers = sum(
        p["spec"]["replicas"] for p in by_kind(docs, "KafkaNodePool").values() if "broker" in p["spec"]["roles"]
    )
    for topic in topics.values():
        spec = topic["spec"]
        assert spec["partitions"] == partitions
        assert spec["replicas"] <= brokers
        assert int(spec["config"]["retention.ms"]) >= 86_400_000
        min_isr = int(spec["config"].get("min.insync.replicas", 1))
        assert min_isr <= spec["replicas"] and (spec["replicas"] == 1 or min_isr < spec["replicas"])
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    for service in CONSUMER_SERVICES:
        assert hpas[service]["spec"]["maxReplicas"] <= partitions, f"{service}: replicas beyond partitions idle"


def test_k8s_prod_has_a_database_cluster_per_service_with_backups_and_no_dev_credentials() -> None:
    docs = render("prod")
    clusters = by_kind(docs, "Cluster")
    assert set(clusters) == {f"crm-pg-{s}" for s in SERVICES}
    backups = {b["spec"]["cluster"]["name"] for b in by_kind(docs, "ScheduledBackup").values()}
    for name, cluster in clusters.items():
        assert cluster["spec"]["instances"] >= 3
        assert cluster["spec"]["backup"]["barmanObjectStore"]["destinationPath"]
        assert name in backups
    for pool in by_kind(docs, "KafkaNodePool").values():
        assert pool["spec"]["replicas"] >= 3
    for secret in by_kind(docs, "Secret").values():
        values = {*secret.get("stringData", {}).values(), *secret.get("data", {}).values()}
        assert not any(str(v).startswith("dev") for v in values), secret["metadata"]["name"]
    for hpa in by_kind(docs, "HorizontalPodAutoscaler").values():
        assert hpa["spec"]["minReplicas"] >= 2


def test_k8s_migration_job_runs_init_without_topics_and_reaches_only_the_databases() -> None:
    for overlay in OVERLAYS:
        docs = render(overlay)
        job = by_kind(docs, "Job")[INIT_JOB]
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert container["command"] == ["python", "deploy/init.py", "--skip-topics"]
        # The Job migrates for exactly the code the Deployments run.
        images = {d["spec"]["template"]["spec"]["containers"][0]["image"] for d in by_kind(docs, "Deployment").values()}
        assert images == {container["image"]}
        assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
        policy = by_kind(docs, "NetworkPolicy")[INIT_JOB]["spec"]
        targets = [p.get("podSelector", {}).get("matchLabels", {}) for r in policy["egress"] for p in r["to"]]
        assert {f"db.crm.io/{s}": "true" for s in SERVICES}.items() <= {
            k: v for t in targets for k, v in t.items()
        }.items()
        assert not any("strimzi.io/cluster" in t for t in targets)


# ---- Dockerfile --------------------------------------------------------------------------------


def test_dockerfile_installs_the_locked_workspace_and_runs_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [
        line.strip()
        for line in text.replace("\\\n", " ").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    stages = [line for line in lines if line.startswith("FROM ")]
    assert len(stages) >= 2, "multi-stage build"
    assert "uv sync --frozen --no-dev --all-packages" in text
    copies = [line.split()[1:] for line in lines if line.startswith("COPY ") and "--from=" not in line]
    sources = {src for *srcs, _dst in copies for src in srcs}
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such path"
    workspace = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["uv"]["workspace"]["members"]
    members = {
        p.parent.relative_to(ROOT).as_posix() for pattern in workspace for p in ROOT.glob(f"{pattern}/pyproject.toml")
    }
    assert {f"{m}/pyproject.toml" for m in members} <= sources, "a workspace member's manifest is not copied"
    assert {"uv.lock", "pyproject.toml", "deploy/init.py"} <= sources
    runtime = lines[lines.index(stages[-1]) :]
    users = [line.split()[1] for line in runtime if line.startswith("USER ")]
    assert users and not users[-1].startswith(("0", "root")), "runtime stage must not run as root"
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert not ignored & {"libs", "services", "uv.lock", "pyproject.toml", "deploy", "deploy/init.py"}


# ---- the init scripts, for real ----------------------------------------------------------------


async def run(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run a command without blocking the test loop; (exit code, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, env=env, cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, stderr.decode(errors="replace")


async def test_postgres_init_script_creates_an_isolated_database_and_login_role_per_service(pg_server: Any) -> None:
    tag = uuid.uuid4().hex[:8]
    names = [f"dt{tag}_{s}" for s in ("a", "b")]
    env = {
        "PATH": f"{pg_server.bin}:{os.environ['PATH']}",
        "PGHOST": "127.0.0.1",
        "PGPORT": str(pg_server.port),
        "POSTGRES_USER": PG_USER,
        "CRM_SERVICES": " ".join(names),
        **{f"CRM_DB_PASSWORD_{n.upper()}": f"pw-{n}" for n in names},
    }
    code, stderr = await run(["bash", str(PG_INIT_SCRIPT)], env, timeout=60)
    assert code == 0, stderr

    try:
        for name in names:
            conn = await asyncpg.connect(
                host="127.0.0.1", port=pg_server.port, user=name, password=f"pw-{name}", database=name
            )
            await conn.execute("CREATE TABLE t (id int)")  # owns its database and its public schema
            await conn.close()
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await asyncpg.connect(host="127.0.0.1", port=pg_server.port, user=names[0], password="x", database=names[1])
    finally:
        admin = await asyncpg.connect(pg_server.admin_url)
        for name in names:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.execute(f'DROP ROLE IF EXISTS "{name}"')
        await admin.close()


async def test_init_job_creates_the_topics_and_migrates_every_database_idempotently(
    broker: Any, make_database: Any
) -> None:
    urls = {service: await make_database() for service in SERVICES}
    prefix = f"dt{uuid.uuid4().hex[:8]}."
    # The job sees only the settings given here, not whatever the test runner's environment holds.
    inherited = {k: v for k, v in os.environ.items() if k.upper() not in accepted_env("init")}
    env = {
        **inherited,
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
        "KAFKA_TOPIC_PARTITIONS": "3",
        "CRM_TOPIC_PREFIX": prefix,
        "CRM_BOOTSTRAP_API_KEY": "deploy-test-bootstrap-key",
        **{f"{s.upper()}_DATABASE_URL": url for s, url in urls.items()},
    }
    for _ in range(2):  # a second run (next release, or a retried Job) changes nothing and succeeds
        code, stderr = await run([sys.executable, str(INIT_SCRIPT)], env, timeout=180)
        assert code == 0, stderr[-3000:]
        if importlib.util.find_spec("ingest.keys") is not None:
            assert "bootstrap API key ensured" in stderr, stderr[-3000:]

    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap)
    await consumer.start()
    try:
        topics = await consumer.topics()
        for topic in ALL_TOPICS:
            assert prefix + topic in topics
            assert len(consumer.partitions_for_topic(prefix + topic) or ()) == 3
    finally:
        await consumer.stop()

    for service, url in urls.items():
        heads = set(ScriptDirectory.from_config(alembic_config(service, url)).get_heads())
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            versions = {r["version_num"] for r in await conn.fetch("SELECT version_num FROM alembic_version")}
        finally:
            await conn.close()
        assert versions == heads, service
