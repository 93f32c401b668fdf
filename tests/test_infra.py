"""infra/ is a test case too: the KubeRay manifests against the KubeRay CRDs, the core objects
against Kubernetes' own schemas, the cluster-launcher YAML against Ray's schema, and every
entrypoint, config path, Serve deployment and metric they name against the repository.
Fast and offline: nothing is applied, built or started.
"""

import ast
import copy
import functools
import json
import lzma
import os
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from ddft import config as ddft_config

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
# KubeRay's CRDs, kept in the repo (xz); DDFT_KUBERAY_CRDS points at another release's folder of them
CRDS = Path(os.environ.get("DDFT_KUBERAY_CRDS", K8S / "crds"))
K8S_VERSION = "1.32"  # the Kubernetes API the core objects are checked against
KUBERAY = {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob", "rayservice.yaml": "RayService"}
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}  # each as it is or .xz
# ray.util.metrics of the training loop; Ray's metrics export adds the ray_ prefix
TRAIN_METRICS = {f"ray_ddft_train_{m}": {"ddft_job", "run"} for m in ("loss", "val_loss", "step", "tokens_per_second")}
GPU_CONFIG = "jobs/configs/video-llava-7b.yaml"
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def needs_crds(test):
    """The CRD checks: where the CRDs are missing they skip, saying so, except on CI (CI=true), where an
    unchecked manifest is a failure."""
    if CRDS.is_dir():
        return test
    why = f"KubeRay CRDs not found at {CRDS} (DDFT_KUBERAY_CRDS names their folder)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return pytest.mark.usefixtures("_crds_missing")(test)
    return pytest.mark.skip(reason=why)(test)


@pytest.fixture
def _crds_missing():
    pytest.fail(f"KubeRay CRDs not found at {CRDS}: the manifests can't be checked on CI")


def load(path: Path):
    return yaml.load(path.read_text(), Loader=Loader)


@functools.cache
def crd_schema(kind: str, unknown_fields: str = "refused") -> dict:
    """spec.versions[v1].schema.openAPIV3Schema of the kind's CRD. Unknown fields "refused", as
    `kubectl apply` (field validation Strict) does, or "pruned", as the CRD is shipped (plain
    jsonschema accepts them)."""
    path = CRDS / CRD_FILES[kind]
    text = path.read_text() if path.exists() else lzma.open(path.with_name(path.name + ".xz"), "rt").read()
    crd = yaml.load(text, Loader=Loader)
    assert crd["spec"]["names"]["kind"] == kind
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    return _no_unknown_fields(copy.deepcopy(schema)) if unknown_fields == "refused" else schema


def _no_unknown_fields(node):
    if isinstance(node, dict):
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for value in node.values():
            _no_unknown_fields(value)
    elif isinstance(node, list):
        for value in node:
            _no_unknown_fields(value)
    return node


def crd_errors(obj: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(crd_schema(obj["kind"]))
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    ]


def manifest(name: str) -> dict:
    return load(K8S / name)


def cluster_spec_of(obj: dict) -> dict:
    """The RayCluster spec of a RayCluster, RayJob or RayService (the same object, not a copy)."""
    return {
        "RayCluster": lambda s: s,
        "RayJob": lambda s: s["rayClusterSpec"],
        "RayService": lambda s: s["rayClusterConfig"],
    }[obj["kind"]](obj["spec"])


def cluster_spec(name: str) -> dict:
    return cluster_spec_of(manifest(name))


def groups(spec: dict) -> dict[str, dict]:
    """head and each worker group by name."""
    return {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def quantity(q) -> float:
    q = str(q)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in units.items():
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * factor
    return float(q)


def serve_config() -> dict:
    return yaml.safe_load(manifest("rayservice.yaml")["spec"]["serveConfigV2"])


def gpu_pipeline():
    return ddft_config.load(REPO / GPU_CONFIG)


# ---------------------------------------------------------------- every file says how it is used

INFRA_YAMLS = sorted(INFRA.rglob("*.yaml"))


def test_infra_has_its_files():
    names = {p.relative_to(INFRA).as_posix() for p in INFRA.rglob("*") if p.is_file()}
    assert names >= {
        "k8s/raycluster.yaml",
        "k8s/rayjob.yaml",
        "k8s/rayservice.yaml",
        "k8s/secret.yaml",
        "k8s/configmap.yaml",
        "k8s/kustomization.yaml",
        "cluster.yaml",
        "docker/Dockerfile",
        "grafana/ddft-dashboard.json",
        "prometheus/scrape.yaml",
        "README.md",
    }


@pytest.mark.parametrize("path", INFRA_YAMLS, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_yaml_parses_and_opens_with_its_command(path):
    assert load(path) is not None
    first = path.read_text().splitlines()[0]
    assert re.match(r"# (kubectl|ray|prometheus|docker) ", first), (
        f"{path}: first line should be the command, got {first!r}"
    )


def test_infra_paths_named_in_docs_and_comments_exist():
    texts = [p.read_text() for p in INFRA.rglob("*") if p.is_file() and p.suffix != ".xz"]
    named = {m.rstrip(".,:)`") for t in texts for m in re.findall(r"\binfra/[\w./-]+", t)}
    missing = sorted(n for n in named if not (REPO / n).exists())
    assert not missing, f"named but missing: {missing}"


# ---------------------------------------------------------------- KubeRay manifests vs the CRDs


@needs_crds
@pytest.mark.parametrize("name", sorted(KUBERAY))
def test_kuberay_manifest_validates_against_its_crd(name):
    obj = manifest(name)
    assert (obj["apiVersion"], obj["kind"]) == ("ray.io/v1", KUBERAY[name])
    assert not crd_errors(obj), "\n".join(crd_errors(obj))
    # the CRD as shipped (unknown fields pruned, not refused) accepts it too
    assert jsonschema.Draft7Validator(crd_schema(obj["kind"], unknown_fields="pruned")).is_valid(obj)


@needs_crds
@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda s: s["workerGroupSpecs"][0].__setitem__("replicas", "two"), "replicas"),
        (lambda s: s["workerGroupSpecs"][0].__setitem__("minReplica", 1), "minReplica"),  # a typo
        (lambda s: s["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0), "num-cpus"),  # must be a string
        (lambda s: s["workerGroupSpecs"][0].pop("groupName"), "groupName"),
        (
            lambda s: ray_container(s["headGroupSpec"]).__setitem__("ports", [{"containerPort": "8265"}]),
            "containerPort",
        ),
    ],
    ids=["replicas-as-string", "unknown-field", "rayStartParams-int", "missing-groupName", "port-as-string"],
)
def test_a_broken_manifest_fails_validation(mutate, where):
    for name in KUBERAY:  # each kind's schema can fail, not only RayCluster's
        obj = manifest(name)
        mutate(cluster_spec_of(obj))
        errors = crd_errors(obj)
        assert errors and any(where in e for e in errors), f"{name}: {errors}"


def test_the_three_clusters_have_the_same_shape():
    shapes = {}
    for name in KUBERAY:
        spec = cluster_spec(name)
        shapes[name] = {
            g: {"start": grp.get("rayStartParams"), "max": grp.get("maxReplicas"), "pod": grp["template"]}
            for g, grp in groups(spec).items()
        }
    first, *rest = shapes.values()
    for name, shape in zip(list(shapes)[1:], rest):
        assert shape == first, f"{name}'s cluster differs from raycluster.yaml's"


@pytest.mark.parametrize("name", sorted(KUBERAY))
def test_every_ray_pod_is_wired_to_the_store_and_exports_metrics(name):
    spec = cluster_spec(name)
    images = set()
    for gname, grp in groups(spec).items():
        pod = grp["template"]
        c = ray_container(grp)
        images.add(c["image"])
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["DDFT_STORE"]["valueFrom"]["configMapKeyRef"] == {"name": "ddft-config", "key": "DDFT_STORE"}, gname
        assert {"secretRef": {"name": "ddft-s3"}} in c.get("envFrom", []), gname
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes[mounts["/etc/ddft"]]["configMap"]["name"] == "ddft-config", gname
        port = grp["rayStartParams"].get("metrics-export-port", "8080")
        ann = pod["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == port, gname
        assert c.get("workingDir") == "/home/ray/ddft", gname
        limits = c["resources"]["limits"]
        if gname == "head":
            assert "nvidia.com/gpu" not in limits and grp["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    gpu = groups(spec)["gpu"]
    assert int(ray_container(gpu)["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert 0 <= gpu["minReplicas"] <= gpu.get("replicas", gpu["minReplicas"]) <= gpu["maxReplicas"]
    assert "cpu" in groups(spec) and "nvidia.com/gpu" not in ray_container(groups(spec)["cpu"])["resources"]["limits"]
    assert len(images) == 1
    assert f"-t {images.pop()} " in (INFRA / "docker/Dockerfile").read_text().splitlines()[0]


def test_the_gpu_pods_fit_every_training_worker_and_model_replica():
    """A worker no pod can hold waits in Ray's queue forever: each job's worker and each
    ModelServer replica must fit one GPU pod."""
    cfg = gpu_pipeline()
    for name in KUBERAY:
        limits = ray_container(groups(cluster_spec(name))["gpu"])["resources"]["limits"]
        cpus, gpus = quantity(limits["cpu"]), quantity(limits["nvidia.com/gpu"])
        for job in cfg.jobs:
            r = job.resources
            assert r.cpus_per_worker <= cpus and r.gpus_per_worker <= gpus, f"{name}: job {job.name} doesn't fit"
        assert cfg.serve.cpus_per_replica <= cpus and cfg.serve.gpus_per_replica <= gpus


# ---------------------------------------------------------------- core objects vs Kubernetes' schemas


def k8s_validate(obj: dict):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the test extra)")
    return kv.validate(obj, K8S_VERSION, strict=True)


def k8s_error_type():
    return pytest.importorskip("kubernetes_validate").ValidationError


def test_kustomization_lists_existing_core_objects():
    kust = manifest("kustomization.yaml")
    assert kust["kind"] == "Kustomization" and kust["resources"]
    for res in kust["resources"]:
        obj = manifest(res)
        k8s_validate(obj)
    assert {manifest(r)["kind"] for r in kust["resources"]} == {"Secret", "ConfigMap"}


def test_secret_holds_the_aws_keys_as_placeholders():
    secret = manifest("secret.yaml")
    k8s_validate(secret)
    assert secret["metadata"]["name"] == "ddft-s3"
    assert set(secret["stringData"]) >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(v == "REPLACE_ME" for v in secret["stringData"].values()), "no real keys in the repository"


def test_configmap_carries_the_store_and_the_gpu_pipeline(tmp_path, monkeypatch):
    cm = manifest("configmap.yaml")
    k8s_validate(cm)
    assert cm["metadata"]["name"] == "ddft-config"
    store = cm["data"]["DDFT_STORE"]
    assert store.startswith("s3://") and ddft_config.StoreConfig(uri=store)
    monkeypatch.delenv(ddft_config.STORE_ENV, raising=False)
    path = tmp_path / "pipeline.yaml"
    path.write_text(cm["data"]["pipeline.yaml"])
    cfg = ddft_config.load(path)
    assert cfg == gpu_pipeline(), f"the ConfigMap's pipeline.yaml drifted from {GPU_CONFIG}"
    monkeypatch.setenv(ddft_config.STORE_ENV, store)
    assert ddft_config.load(path).store.uri == store  # what the pods see


@pytest.mark.parametrize("name", sorted(KUBERAY))
def test_pod_templates_validate_as_kubernetes_pods(name):
    for gname, grp in groups(cluster_spec(name)).items():
        k8s_validate(
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": f"ddft-{gname}"},
                "template": grp["template"],
            }
        )


def test_a_broken_core_object_fails_validation():
    cm = manifest("configmap.yaml")
    cm["data"]["replicas"] = 2  # ConfigMap values are strings
    with pytest.raises(k8s_error_type()):
        k8s_validate(cm)
    secret = manifest("secret.yaml")
    secret["stringdata"] = secret.pop("stringData")  # a typo: strict mode refuses unknown fields
    with pytest.raises(k8s_error_type()):
        k8s_validate(secret)
    pod = groups(cluster_spec("raycluster.yaml"))["gpu"]["template"]
    ray_container({"template": pod})["env"][0]["valueFrom"]["configMapKeyRef"]["optional"] = "no"
    with pytest.raises(k8s_error_type()):
        k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": pod})


# ---------------------------------------------------------------- what the manifests run exists


def script_command(script: Path) -> list[str]:
    """The ddft CLI command a jobs/*.py script runs: main(["train", *sys.argv[1:]]) -> ["train"]."""
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "main" and node.args:
            return [e.value for e in node.args[0].elts if isinstance(e, ast.Constant)]
    raise AssertionError(f"{script} does not call main([...])")


def test_rayjob_runs_existing_scripts_with_real_flags():
    from ddft.cli import parser

    job = manifest("rayjob.yaml")["spec"]
    commands = [shlex.split(c) for c in job["entrypoint"].split("&&")]
    assert commands[-1][:2] == ["python", "jobs/train_all.py"]
    for argv in commands:
        assert argv[0] == "python", argv
        script = REPO / argv[1]
        assert script.is_file(), f"{argv[1]} not in the repository"
        try:
            args = parser().parse_args(script_command(script) + argv[2:])
        except SystemExit:
            raise AssertionError(f"{' '.join(argv)}: the ddft CLI refuses these flags") from None
        assert args.config == GPU_CONFIG and (REPO / args.config).is_file()
    gpu_pipeline()  # and the config validates
    assert isinstance(yaml.safe_load(job["runtimeEnvYAML"]), dict)
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0


# ---------------------------------------------------------------- the RayService's Serve config


def test_rayservice_serve_config_is_a_serve_deploy_schema():
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    raw = serve_config()
    ServeDeploySchema.model_validate(raw)
    # Serve's schema ignores unknown keys; a misspelt option would silently do nothing
    assert set(raw) <= set(ServeDeploySchema.model_fields), set(raw) - set(ServeDeploySchema.model_fields)
    for app in raw["applications"]:
        assert set(app) <= set(ServeApplicationSchema.model_fields), app.keys()
        for dep in app["deployments"]:
            assert set(dep) <= set(DeploymentSchema.model_fields), (
                dep["name"],
                set(dep) - set(DeploymentSchema.model_fields),
            )
    mutated = copy.deepcopy(raw)
    mutated["applications"][0]["deployments"][0]["num_replicas"] = "two"
    with pytest.raises(ValueError):  # pydantic's ValidationError is one
        ServeDeploySchema.model_validate(mutated)


def test_rayservice_runs_the_app_of_serve_config_yaml():
    local = load(REPO / "serve/config.yaml")["applications"][0]
    app = serve_config()["applications"][0]
    assert app["import_path"] == local["import_path"] == "serve.app:build_app"
    module, attr = app["import_path"].split(":")
    source = REPO / (module.replace(".", "/") + ".py")
    tree = ast.parse(source.read_text())
    builder = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == attr), None)
    assert builder is not None and [a.arg for a in builder.args.args] == ["args"], f"{attr} in {source}"
    assert set(app["args"]) == set(local["args"]) == {"config"}
    assert (REPO / app["args"]["config"]).is_file() and app["args"]["config"] == GPU_CONFIG
    names = {d["name"] for d in app["deployments"]}
    assert names == {d["name"] for d in local["deployments"]} == {"Gateway", "ModelServer"}
    code = (REPO / "serve/app.py").read_text() + (REPO / "serve/gateway.py").read_text()
    assert 'name="ModelServer"' in code and re.search(r"^class Gateway\b", code, re.M)


def test_rayservice_model_replicas_get_a_gpu_each():
    cfg = gpu_pipeline()
    dep = {d["name"]: d for d in serve_config()["applications"][0]["deployments"]}["ModelServer"]
    opts = dep["ray_actor_options"]
    assert opts["num_gpus"] == 1 == cfg.serve.gpus_per_replica and opts["num_cpus"] == cfg.serve.cpus_per_replica
    auto = dep["autoscaling_config"]
    gpu = groups(cluster_spec("rayservice.yaml"))["gpu"]
    assert dep["num_replicas"] == "auto" and 1 <= auto["min_replicas"] <= auto["max_replicas"] <= gpu["maxReplicas"]
    assert gpu["minReplicas"] >= auto["min_replicas"], "a GPU pod should be up for the first replica"
    assert serve_config()["http_options"] == {"host": "0.0.0.0", "port": 8000}


# ---------------------------------------------------------------- the cluster launcher


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def launcher_errors(cfg: dict) -> list[str]:
    return [e.message for e in jsonschema.Draft7Validator(ray_schema()).iter_errors(cfg)]


def makefile_torch_pin() -> str:
    m = re.search(r"pip install --quiet (torch==\S+ torchvision==\S+)", (REPO / "Makefile").read_text())
    assert m, "the Makefile's torch pin moved"
    return m.group(1)


def test_cluster_launcher_yaml_validates_against_rays_schema():
    cfg = load(INFRA / "cluster.yaml")
    assert not launcher_errors(cfg), launcher_errors(cfg)
    assert cfg["provider"]["type"] == "aws" and cfg["head_node_type"] in cfg["available_node_types"]
    types = cfg["available_node_types"]
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu and all(t["node_config"]["InstanceType"].startswith("g5.") for t in gpu)
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cfg["max_workers"]
    for job in gpu_pipeline().jobs:
        assert any(
            job.resources.cpus_per_worker <= t["resources"]["CPU"]
            and job.resources.gpus_per_worker <= t["resources"]["GPU"]
            for t in gpu
        ), job.name


def test_cluster_launcher_installs_the_repo_as_the_makefile_does():
    cfg = load(INFRA / "cluster.yaml")
    setup = " ; ".join(cfg["setup_commands"])
    assert makefile_torch_pin() in setup and re.search(r"pip install .*-e ~/ddft", setup)
    assert cfg["file_mounts"]["~/ddft"] == "."
    assert "2.60" in cfg["docker"]["image"] and "py311" in cfg["docker"]["image"]
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        assert "--metrics-export-port=8080" in " ".join(cmds)
    assert "--dashboard-host=0.0.0.0" in " ".join(cfg["head_start_ray_commands"])


def test_dockerfile_pins_what_the_makefile_and_pyproject_pin():
    text = (INFRA / "docker/Dockerfile").read_text()
    assert makefile_torch_pin() in text
    ray_pin = re.search(r'"ray\[[^]]*\]==(\d+\.\d+)', (REPO / "pyproject.toml").read_text()).group(1)
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray_pin)}\.\d+-py311-gpu$", text, re.M)
    assert "WORKDIR /home/ray/ddft" in text and "PYTHONPATH=/home/ray/ddft" in text


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.__setitem__("max_workers", "five"),
        lambda c: c["available_node_types"]["ray.worker.gpu"]["resources"].__setitem__("GPU", 0.5),
        lambda c: c.__setitem__("head_start_commands", []),  # not a launcher key
    ],
    ids=["max_workers-string", "fractional-resource", "unknown-key"],
)
def test_a_broken_cluster_launcher_yaml_fails(mutate):
    cfg = load(INFRA / "cluster.yaml")
    mutate(cfg)
    assert launcher_errors(cfg)


# ---------------------------------------------------------------- metrics: Grafana and Prometheus


def serve_metric_labels() -> dict[str, set[str]]:
    """The series names serve/prometheus.py exposes, each with its labels."""
    from serve import prometheus as metrics

    m = metrics.Metrics()
    exposed = {}
    for metric in vars(m).values():
        name, kind, labels = (
            getattr(metric, "_name", None),
            getattr(metric, "_type", None),
            getattr(metric, "_labelnames", ()),
        )
        if not name:
            continue
        suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}[kind]
        for s in suffixes:
            exposed[name + s] = set(labels) | ({"le"} if s == "_bucket" else set())
    for family in m.engines.collect():
        exposed[family.name + ("_total" if family.type == "counter" else "")] = set(family._labelnames)
    assert exposed, "serve/prometheus.py exposes nothing?"
    return exposed


def dashboard() -> dict:
    return json.loads((INFRA / "grafana/ddft-dashboard.json").read_text())


def panels(dash: dict):
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


METRIC = re.compile(r"\b(?:ray_)?ddft_(?!job\b)[a-z_]+")


def labels_used(expr: str) -> set[str]:
    used = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        used |= {g.strip() for g in group.split(",") if g.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        used |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    return used


def test_dashboard_panels_query_known_metrics_with_their_labels():
    dash = dashboard()
    assert dash["schemaVersion"] >= 36 and dash["title"] and dash["uid"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    known = {**serve_metric_labels(), **TRAIN_METRICS}
    used, ids = set(), set()
    for p in panels(dash):
        assert p["id"] not in ids
        ids.add(p["id"])
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            expr = t.get("expr", "").strip()
            assert expr, f"panel {p['title']!r}: target {t.get('refId')} has no PromQL expr"
            assert expr.count("(") == expr.count(")"), expr
            names = set(METRIC.findall(expr))
            assert names, f"panel {p['title']!r} queries no ddft metric: {expr}"
            unknown = names - set(known)
            assert not unknown, f"panel {p['title']!r}: {unknown} is not a ddft metric (serve/prometheus.py or train)"
            allowed = set().union(*(known[n] for n in names))
            assert labels_used(expr) <= allowed, f"{p['title']!r}: labels {labels_used(expr) - allowed} not on {names}"
            used |= names
    # every metric the app and the trainer export is on the dashboard
    wanted = {n for n in known if not n.endswith(("_sum", "_count"))}
    assert wanted <= used, f"not on the dashboard: {sorted(wanted - used)}"
    for v in variables.values():
        if v["type"] == "query":
            metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", v["definition"]).groups()
            assert label in known[metric], v["name"]


def test_prometheus_scrapes_the_gateway_and_rays_metrics_port():
    cfg = load(INFRA / "prometheus/scrape.yaml")
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    serve_job = jobs["ddft-serve"]
    targets = [t for sc in serve_job["static_configs"] for t in sc["targets"]]
    assert serve_job["metrics_path"] == "/metrics" and all(t.endswith(":8000") for t in targets)
    assert "ddft-serve-serve-svc" in targets[0]  # KubeRay names the Serve service <rayservice>-serve-svc
    assert manifest("rayservice.yaml")["metadata"]["name"] == "ddft-serve"
    ray_job = jobs["ray"]
    keep = [r for r in ray_job["relabel_configs"] if r.get("action") == "keep"]
    assert any("prometheus_io_scrape" in r["source_labels"][0] for r in keep)
